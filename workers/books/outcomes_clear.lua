-- Forget that images of one chunk have an outcome: their rows are gone from the output
-- (`carnumber verify --republish`), so they must be answered again (workers/outcomes.py).
-- KEYS[1] the run's outcomes hash   KEYS[2] the run's hash
-- ARGV[1] chunk id   ARGV[2..] positions
-- Returns how many were set (and are cleared now); images_written goes down by as many.
local map = redis.call('HGET', KEYS[1], ARGV[1])
if not map then return 0 end
local bytes = {}
for i = 1, #map do bytes[i] = string.byte(map, i) end
local cleared = 0
for i = 2, #ARGV do
  local p = tonumber(ARGV[i])
  local b = math.floor(p / 8) + 1
  local m = bit.lshift(1, p % 8)
  if b <= #bytes and bit.band(bytes[b], m) ~= 0 then
    bytes[b] = bit.band(bytes[b], bit.bnot(m))
    cleared = cleared + 1
  end
end
if cleared > 0 then
  local chars = {}
  for i = 1, #bytes do chars[i] = string.char(bytes[i]) end
  redis.call('HSET', KEYS[1], ARGV[1], table.concat(chars))
  redis.call('HINCRBY', KEYS[2], 'images_written', -cleared)
end
return cleared
