-- Read a rate limit's state without changing it (adapt.lua, put in front by redis_backend.py,
-- computes the factor).
-- KEYS[1]  rate key (string TAT, microseconds)
-- KEYS[2]  adapt key (hash, adapt.lua)
-- ARGV[1..9]  the reaction's figures (Reaction.args)
-- Returns {factor_ppm in force, booked_ahead_us: how far past now the next free slot lies}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local factor = factor_at(read_adapt(KEYS[2]), now, reaction(1))
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
local ahead = tat - now
if ahead < 0 then ahead = 0 end
return {math.floor(factor), ahead}
