-- Record one call's outcome in the circuit breaker of one account.
-- KEYS[1]  the circuit hash (Keys.circuit(account)): state, ring, opened_ms, probe_until_ms
-- ARGV[1]  '1' the service answered, '0' it looked down
-- ARGV[2]  window (outcomes kept)   ARGV[3]  min calls before it may open
-- ARGV[4]  failure ratio that opens it (0..1]   ARGV[5]  key time-to-live, ms
-- Returns 'closed'; 'opened' when this outcome opened the circuit; 'open' when it was open
-- already (the outcome is then ignored).
-- The ring is a string of '1'/'0', newest last. Mirrored by _MemoryBackend in fleet.py.
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'open' then
  -- Outcomes of calls admitted before it opened: the cooldown outlasts any call, so they are stale.
  return 'open'
end
local ok = ARGV[1] == '1'
local function open()
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', KEYS[1], 'state', 'open', 'ring', '', 'opened_ms', now)
  redis.call('HDEL', KEYS[1], 'probe_until_ms')
  redis.call('HINCRBY', KEYS[1], 'opens', 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return 'opened'
end
if state == 'half_open' then
  -- The probe's answer decides (any outcome reported while half-open is as fresh as the probe).
  if not ok then
    return open()
  end
  redis.call('HSET', KEYS[1], 'state', 'closed', 'ring', '')
  redis.call('HDEL', KEYS[1], 'opened_ms', 'probe_until_ms')
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return 'closed'
end
local window = tonumber(ARGV[2])
local ring = (redis.call('HGET', KEYS[1], 'ring') or '') .. (ok and '1' or '0')
if #ring > window then
  ring = string.sub(ring, -window)
end
local _, failures = string.gsub(ring, '0', '')
if #ring >= tonumber(ARGV[3]) and failures >= tonumber(ARGV[4]) * #ring then
  return open()
end
redis.call('HSET', KEYS[1], 'state', 'closed', 'ring', ring)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 'closed'
