-- Stop the fleet of one account; the first stop wins and later ones change nothing.
-- KEYS[1]  the stop hash (Keys.stop(account))
-- ARGV[1]  error code      ARGV[2]  message (no secrets)      ARGV[3]  run id, '' for none
-- Returns {won, code, message}: won is 1 when this call set the flag, 0 when it was set before;
-- code and message are those of the stop in force. Time is Redis's own (seconds, ms precision).
local held = redis.call('HMGET', KEYS[1], 'code', 'message')
if held[1] then
  return {0, held[1], held[2] or ''}
end
local t = redis.call('TIME')
local at = string.format('%d.%03d', tonumber(t[1]), math.floor(tonumber(t[2]) / 1000))
redis.call('HSET', KEYS[1], 'code', ARGV[1], 'message', ARGV[2], 'at', at, 'run', ARGV[3])
return {1, ARGV[1], ARGV[2]}
