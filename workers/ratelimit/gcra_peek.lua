-- Read a rate limit's state without changing it.
-- KEYS[1]  rate key (string TAT, microseconds)
-- KEYS[2]  adapt key (hash {factor_ppm, at_us})
-- ARGV[1]  recovery_s (> 0)
-- Returns {factor_ppm in force, booked_ahead_us: how far past now the next free slot lies}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local factor = 1000000
local adapt = redis.call('HMGET', KEYS[2], 'factor_ppm', 'at_us')
if adapt[1] then
  factor = tonumber(adapt[1]) + (now - tonumber(adapt[2])) / tonumber(ARGV[1])
  if factor > 1000000 then factor = 1000000 end
end
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
local ahead = tat - now
if ahead < 0 then ahead = 0 end
return {math.floor(factor), ahead}
