-- Reserve one call against the current quota window, or read it; the window comes from Redis's
-- clock (twin of windows.window_key and MemoryBackend.quota_reserve).
-- KEYS     none: the counter's name depends on Redis's date, so it is built here from ARGV[1]
--          (fine on one Redis server; on a cluster every prefix must hash to one slot)
-- ARGV[1]  key prefix, e.g. carnumber:quota:<account>
-- ARGV[2]  window: 'day' ({prefix}:day:YYYY-MM-DD) or 'total' ({prefix}:total)
-- ARGV[3]  limit: calls allowed in the window (integer >= 0; ignored by 'peek')
-- ARGV[4]  utc_offset_s: the day runs midnight to midnight at this offset from UTC (0 = UTC day)
-- ARGV[5]  mode: 'reserve' (count one call if any is left) or 'peek' (change nothing)
-- ARGV[6]  (optional) a window key the caller has seen counted up to ARGV[7]: when this window's
-- ARGV[7]  counter is lower (a Redis crash lost its last writes), it is raised to that first
-- Returns {granted (1|0), used (calls counted now), window key, resets_at_s (-1 = never)}.
if redis.replicate_commands then redis.replicate_commands() end

-- Days since 1970-01-01 to a civil date (H. Hinnant's days_from_civil, inverted).
local function civil(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end

local key, resets, expire_at = ARGV[1] .. ':total', -1, nil
if ARGV[2] == 'day' then
  local t = redis.call('TIME')
  local offset = tonumber(ARGV[4])
  local day = math.floor((tonumber(t[1]) + offset) / 86400)
  local y, m, d = civil(day)
  key = string.format('%s:day:%04d-%02d-%02d', ARGV[1], y, m, d)
  resets = (day + 1) * 86400 - offset
  expire_at = resets + 86400  -- yesterday's count stays readable for a day
end

local used = tonumber(redis.call('GET', key) or 0)
if ARGV[5] == 'reserve' and ARGV[6] == key and used < tonumber(ARGV[7]) then
  used = tonumber(ARGV[7])
  redis.call('SET', key, used)
  if expire_at then redis.call('EXPIREAT', key, expire_at) end
end
if ARGV[5] ~= 'reserve' or used >= tonumber(ARGV[3]) then
  return {0, used, key, resets}
end
used = redis.call('INCR', key)
if expire_at then redis.call('EXPIREAT', key, expire_at) end
return {1, used, key, resets}
