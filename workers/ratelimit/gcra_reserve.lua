-- Reserve the next slot of a GCRA rate limit, at Redis's own clock (twin of gcra.reserve; the
-- factor is adapt.lua's factor_at, which redis_backend.py puts in front of this script).
-- KEYS[1]  rate key: string, TAT (theoretical arrival time of the next call), microseconds of TIME
-- KEYS[2]  adapt key: hash, the state the last throttles left (adapt.lua)
-- ARGV[1]  interval_us: spacing at the configured qps, microseconds (integer >= 1)
-- ARGV[2]  burst: calls allowed back to back (integer >= 1)
-- ARGV[3..11]  the reaction's figures (Reaction.args)
-- Returns {slot_us, now_us, tat_us, increment_us, factor_ppm}: the caller sleeps slot_us - now_us
-- and then sends one request; tat_us and increment_us identify the reservation for a give-back.
if redis.replicate_commands then redis.replicate_commands() end  -- TIME before writes (Redis < 5)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local factor = factor_at(read_adapt(KEYS[2]), now, reaction(3))

local increment = math.ceil(interval * 1000000 / factor)
local tolerance = (burst - 1) * interval
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local slot = tat - tolerance
if slot < now then slot = now end
local new_tat = tat + increment
-- The key is worthless once its TAT has passed; let it go a second after that.
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {slot, now, new_tat, increment, math.floor(factor)}
