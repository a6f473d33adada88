-- Reserve the next slot of a GCRA rate limit, at Redis's own clock (twin of gcra.reserve).
-- KEYS[1]  rate key: string, TAT (theoretical arrival time of the next call), microseconds of TIME
-- KEYS[2]  adapt key: hash {factor_ppm, at_us}, the factor set by the last throttle and when
-- ARGV[1]  interval_us: spacing at the configured qps, microseconds (integer >= 1)
-- ARGV[2]  burst: calls allowed back to back (integer >= 1)
-- ARGV[3]  recovery_s: seconds for the factor to climb by 1.0 after a throttle (> 0)
-- Returns {slot_us, now_us, tat_us, increment_us, factor_ppm}: the caller sleeps slot_us - now_us
-- and then sends one request; tat_us and increment_us identify the reservation for a give-back.
if redis.replicate_commands then redis.replicate_commands() end  -- TIME before writes (Redis < 5)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local recovery_s = tonumber(ARGV[3])

local factor = 1000000
local adapt = redis.call('HMGET', KEYS[2], 'factor_ppm', 'at_us')
if adapt[1] then
  factor = tonumber(adapt[1]) + (now - tonumber(adapt[2])) / recovery_s
  if factor >= 1000000 then
    factor = 1000000
    redis.call('DEL', KEYS[2])
  end
end

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
