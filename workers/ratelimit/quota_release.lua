-- Give one reserved call back to the window it was reserved in; never below zero.
-- KEYS[1]  the window's counter (as quota_window.lua returned it)
-- Returns 1 when a call was given back, 0 when the counter was already 0 or gone.
local used = tonumber(redis.call('GET', KEYS[1]) or 0)
if used <= 0 then
  return 0
end
redis.call('DECR', KEYS[1])
return 1
