-- Give back a reserved slot that was never used, if no later slot was reserved (twin of gcra.give_back).
-- KEYS[1]  rate key (string TAT, microseconds)
-- ARGV[1]  tat_us the reservation left behind
-- ARGV[2]  increment_us it added
-- Returns 1 when the slot was given back, 0 when a later reservation exists (the slot is lost).
local cur = redis.call('GET', KEYS[1])
if not cur or tonumber(cur) ~= tonumber(ARGV[1]) then
  return 0
end
local restored = string.format('%.0f', tonumber(cur) - tonumber(ARGV[2]))
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('SET', KEYS[1], restored, 'PX', ttl)
else
  redis.call('SET', KEYS[1], restored)
end
return 1
