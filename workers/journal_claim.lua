-- Ask for the right to call the API for one image (workers/journal.py).
-- KEYS[1] the run's answers hash      KEYS[2] the image's claim key
-- KEYS[3] the run's set of written part names (optional)
-- ARGV[1] image id   ARGV[2] this caller's token   ARGV[3] claim lifetime, ms
-- ARGV[4] the caller's chunk's part name (optional)
-- Returns {'written'} when another holder of the chunk has written its whole part already (its
-- answers may be forgotten: calling would pay twice), {'answer', json} when the image is
-- answered, {'won'} when the caller holds the claim now (a new one, or its own renewed),
-- {'held', ms left} when another caller does.
if ARGV[4] and ARGV[4] ~= '' and redis.call('SISMEMBER', KEYS[3], ARGV[4]) == 1 then
  return {'written'}
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
