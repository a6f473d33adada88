-- Record a throttling answer, at Redis's own clock (twin of adapt.on_throttle; adapt.lua, which
-- redis_backend.py puts in front of this script, holds the policy).
-- KEYS[1]  rate key: string TAT, microseconds (slots up to it were booked at the old rate)
-- KEYS[2]  adapt key: hash, the adaptive state (adapt.lua)
-- ARGV[1]  calls_per_s: the pacing at factor 1.0 (to tell a lone throttle from repeated ones)
-- ARGV[2..10]  the reaction's figures (Reaction.args)
-- Returns {factor_ppm in force now, what the throttle did: 0 held, 1 lone, 2 repeated}.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local r = reaction(2)
local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
local state, kind = on_throttle(read_adapt(KEYS[2]), tat, now, tonumber(ARGV[1]), r)
write_adapt(KEYS[2], state, now, r)
return {math.floor(factor_at(state, now, r)), kind}
