-- Lower the shared rate after a throttling answer, at Redis's own clock (twin of gcra.throttle).
-- KEYS[1]  adapt key: hash {factor_ppm, at_us}
-- ARGV[1]  decrease: multiplier per throttle (0 < d < 1)
-- ARGV[2]  floor: lowest factor (0 < f <= 1)
-- ARGV[3]  recovery_s: seconds for the factor to climb by 1.0 (> 0)
-- ARGV[4]  hold_s: throttles within this long of the last decrease count as the same event
-- Returns {factor_ppm in force, 1 if this call lowered it else 0}.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local decrease = tonumber(ARGV[1])
local floor = tonumber(ARGV[2]) * 1000000
local recovery_s = tonumber(ARGV[3])
local hold_us = tonumber(ARGV[4]) * 1000000

local factor = 1000000
local adapt = redis.call('HMGET', KEYS[1], 'factor_ppm', 'at_us')
if adapt[1] then
  local at = tonumber(adapt[2])
  factor = tonumber(adapt[1]) + (now - at) / recovery_s
  if factor > 1000000 then factor = 1000000 end
  if now - at < hold_us then
    return {math.floor(factor), 0}
  end
end
local lowered = math.floor(math.max(floor, factor * decrease))
redis.call('HSET', KEYS[1], 'factor_ppm', string.format('%.0f', lowered), 'at_us', string.format('%.0f', now))
-- Gone once fully recovered (plus the hold window, plus a second).
local ttl_ms = math.ceil((1000000 - lowered) * recovery_s / 1000 + hold_us / 1000) + 1000
redis.call('PEXPIRE', KEYS[1], ttl_ms)
return {lowered, 1}
