-- Journal one paid answer and let go of the image's claim (workers/journal.py).
-- KEYS[1] the run's answers hash      KEYS[2] the image's claim key
-- ARGV[1] image id   ARGV[2] the answer (JSON)   ARGV[3] journal lifetime, s   ARGV[4] token
-- The first answer stays (a second would be a second payment already made: keep one).
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if redis.call('GET', KEYS[2]) == ARGV[4] then
  redis.call('DEL', KEYS[2])
end
return 1
