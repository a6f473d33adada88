-- Lower the shared rate after a throttling answer, at Redis's own clock (twin of gcra.throttle).
-- KEYS[1]  rate key: string TAT, microseconds (slots up to it were booked at the old rate)
-- KEYS[2]  adapt key: hash {factor_ppm, at_us, hold_until_us}
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
local hold_us = math.ceil(tonumber(ARGV[4]) * 1000000)

local factor = 1000000
local adapt = redis.call('HMGET', KEYS[2], 'factor_ppm', 'at_us', 'hold_until_us')
if adapt[1] then
  factor = tonumber(adapt[1]) + (now - tonumber(adapt[2])) / recovery_s
  if factor > 1000000 then factor = 1000000 end
  if now < tonumber(adapt[3] or 0) then
    return {math.floor(factor), 0}
  end
end
local lowered = math.floor(math.max(floor, factor * decrease))
local hold_until = now + hold_us
local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
if tat > hold_until then hold_until = tat end
redis.call('HSET', KEYS[2], 'factor_ppm', string.format('%.0f', lowered),
  'at_us', string.format('%.0f', now), 'hold_until_us', string.format('%.0f', hold_until))
-- Forget it once fully recovered and no longer holding, plus a second.
local ttl_us = (1000000 - lowered) * recovery_s
if hold_until - now > ttl_us then ttl_us = hold_until - now end
redis.call('PEXPIRE', KEYS[2], math.ceil(ttl_us / 1000) + 1000)
return {lowered, 1}
