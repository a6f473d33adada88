-- Let go of an image's claim without an answer (pending, parked, a retryable failure).
-- KEYS[1] the image's claim key   ARGV[1] this caller's token
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
