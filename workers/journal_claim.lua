-- Ask for the right to call the API for one image (workers/journal.py).
-- KEYS[1] the run's answers hash      KEYS[2] the image's claim key
-- ARGV[1] image id   ARGV[2] this caller's token   ARGV[3] claim lifetime, ms
-- Returns {'answer', json} when the image is already answered, {'won'} when the caller holds
-- the claim now (a new one, or its own renewed), {'held', ms left} when another caller does.
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
