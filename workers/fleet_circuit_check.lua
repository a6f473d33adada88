-- May a call go through the circuit breaker of one account? Claims the half-open probe if so.
-- KEYS[1]  the circuit hash (Keys.circuit(account)): state, ring, opened_ms, probe_until_ms
-- ARGV[1]  cooldown, ms      ARGV[2]  probe lease, ms      ARGV[3]  key time-to-live, ms
-- Returns {verdict, wait_ms}: 0 closed, go; 1 go, and this caller is the one probe;
-- 2 open, do not call, a probe may go in wait_ms. Time is Redis's own.
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'closed' then
  return {0, 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ready_at
if state == 'open' then
  ready_at = tonumber(redis.call('HGET', KEYS[1], 'opened_ms') or 0) + tonumber(ARGV[1])
else
  -- half_open: a probe holds a lease; a probe that never reports is presumed lost when it ends.
  ready_at = tonumber(redis.call('HGET', KEYS[1], 'probe_until_ms') or 0)
end
if now < ready_at then
  return {2, ready_at - now}
end
redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe_until_ms', now + tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, 0}
