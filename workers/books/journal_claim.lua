-- Ask for the right to call the API for one image (workers/journal.py).
-- KEYS[1] the run's answers hash      KEYS[2] the image's claim key
-- KEYS[3] the run's outcomes hash (chunk id -> bitmap, workers/outcomes.py; optional)
-- ARGV[1] the picture's key   ARGV[2] this caller's token   ARGV[3] claim lifetime, ms
-- ARGV[4] the caller's chunk id and ARGV[5] the image's position in it (optional)
-- Returns {'written'} when the image already has its outcome in the output (another holder of
-- its chunk wrote it: calling would pay twice, and its answer may be dropped with the journal),
-- {'answer', json} when the picture is answered, {'won'} when the caller holds the claim now (a
-- new one, or its own renewed), {'held', ms left} when another caller does.
if ARGV[4] and ARGV[4] ~= '' then
  local map = redis.call('HGET', KEYS[3], ARGV[4])
  if map then
    local p = tonumber(ARGV[5])
    local b = math.floor(p / 8) + 1
    if b <= #map and bit.band(string.byte(map, b), bit.lshift(1, p % 8)) ~= 0 then
      return {'written'}
    end
  end
end
local answer = redis.call('HGET', KEYS[1], ARGV[1])
if answer then
  return {'answer', answer}
end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then
  return {'won'}
end
if redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return {'won'}
end
return {'held', redis.call('PTTL', KEYS[2])}
