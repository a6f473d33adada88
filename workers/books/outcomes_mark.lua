-- Record that images of one chunk have their outcome (workers/outcomes.py).
-- KEYS[1] the run's outcomes hash (chunk id -> bitmap: bit p set once the image at position p
--         of the chunk has an outcome in the output)
-- KEYS[2] the run's hash (counters)   KEYS[3] the run's set of written part names
-- ARGV[1] chunk id   ARGV[2] the part written ('' for none)
-- ARGV[3..] triples: position, failed (0 or 1), plates
-- Only images new to the bitmap are counted (images_written, images_failed, plates), so a chunk
-- run twice, or in pieces, or republished, is counted once per image. Returns how many were new.
local map = redis.call('HGET', KEYS[1], ARGV[1]) or ''
local bytes = {}
for i = 1, #map do bytes[i] = string.byte(map, i) end
local new, failed, plates = 0, 0, 0
for i = 3, #ARGV, 3 do
  local p = tonumber(ARGV[i])
  local b = math.floor(p / 8) + 1
  local m = bit.lshift(1, p % 8)
  for j = #bytes + 1, b do bytes[j] = 0 end
  if bit.band(bytes[b], m) == 0 then
    bytes[b] = bit.bor(bytes[b], m)
    new = new + 1
    failed = failed + tonumber(ARGV[i + 1])
    plates = plates + tonumber(ARGV[i + 2])
  end
end
if new > 0 then
  local chars = {}
  for i = 1, #bytes do chars[i] = string.char(bytes[i]) end
  redis.call('HSET', KEYS[1], ARGV[1], table.concat(chars))
  redis.call('HINCRBY', KEYS[2], 'images_written', new)
  redis.call('HINCRBY', KEYS[2], 'images_failed', failed)
  redis.call('HINCRBY', KEYS[2], 'plates', plates)
end
if ARGV[2] ~= '' then redis.call('SADD', KEYS[3], ARGV[2]) end
return new
