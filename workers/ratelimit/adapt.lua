-- The adaptive factor and the reaction to a throttle (line-by-line twin of adapt.py). Not a script
-- on its own: redis_backend.py puts it in front of gcra_reserve, gcra_throttled and gcra_peek.
-- The reaction's figures come from ARGV in Reaction.args order, starting at a given index:
-- lone_decrease, climb_s, decrease, knee, probe_s, floor, hold_s, memory_s, repeated_share.
local PPM = 1000000
local HELD, LONE, REPEATED = 0, 1, 2
local SAMPLE_CALLS = 8  -- fewer calls since the last change do not place the real limit

local function reaction(from)
  local r = {}
  local names = {'lone_decrease', 'climb_s', 'decrease', 'knee', 'probe_s', 'floor', 'hold_s',
    'memory_s', 'repeated_share'}
  for i, name in ipairs(names) do r[name] = tonumber(ARGV[from + i - 1]) end
  return r
end

-- The state in the adapt hash, or nil. A hash written before knee and score existed reads as
-- probing from its factor with no score.
local function read_adapt(key)
  local v = redis.call('HMGET', key, 'factor_ppm', 'at_us', 'knee_ppm', 'hold_until_us', 'score',
    'score_at_us', 'since')
  if not v[1] then return nil end
  return {factor = tonumber(v[1]), at = tonumber(v[2]), knee = tonumber(v[3] or v[1]),
    hold_until = tonumber(v[4] or 0), score = tonumber(v[5] or 0), score_at = tonumber(v[6] or v[2]),
    since = tonumber(v[7] or 0)}
end

local function factor_at(a, now, r)
  if not a then return PPM end
  local f0, dt = a.factor, math.max(0, now - a.at) / PPM
  if f0 < a.knee then
    local fast = (a.knee - f0) * r.climb_s / PPM
    if dt <= fast then return f0 + dt * PPM / r.climb_s end
    f0, dt = a.knee, dt - fast
  end
  return math.min(PPM, f0 + a.knee * (dt / r.probe_s) ^ 2)
end

local function decayed_score(a, now, r)
  if not a then return 0 end
  return a.score * math.exp(-math.max(0, now - a.score_at) / (r.memory_s * PPM))
end

-- Returns the new state and what the throttle did (HELD, LONE or REPEATED).
local function on_throttle(a, tat, now, calls_per_s, r)
  local score = decayed_score(a, now, r) + 1
  local hold = math.ceil(r.hold_s * PPM)
  if a and now < a.hold_until then
    local since = a.since
    if now >= a.hold_until - hold then since = since + 1 end
    return {factor = a.factor, at = a.at, knee = a.knee, hold_until = a.hold_until, score = score,
      score_at = now, since = since}, HELD
  end
  local level = factor_at(a, now, r)
  local recent_calls = r.memory_s * calls_per_s * level / PPM
  local calls, share = 0, 0
  if a then calls = (now - math.max(a.at, a.hold_until - hold)) / PPM * calls_per_s * level / PPM end
  if a and calls >= SAMPLE_CALLS then share = a.since / calls end
  local lowered, knee, kind
  local probing = a ~= nil and a.knee < PPM and level < PPM
  local recent = score >= r.repeated_share * recent_calls or
    (a ~= nil and a.since >= 1 and share >= r.repeated_share)
  if a and (probing or (score >= 1.5 and recent)) then
    knee = level * math.max(0, 1 - share) * r.knee
    lowered = math.max(r.floor * PPM, math.min(level * r.decrease, knee))
    if level < a.knee then knee = lowered end
    knee = math.max(lowered, knee)
    kind = REPEATED
  else
    lowered = math.max(r.floor * PPM, level * r.lone_decrease)
    knee = level
    if a and a.knee > knee then knee = a.knee end
    kind = LONE
  end
  local hold_until = math.max(now, tat or 0) + hold
  return {factor = math.floor(lowered), at = now, knee = math.floor(knee), hold_until = hold_until,
    score = score, score_at = now, since = 0}, kind
end

local function expires_after_us(a, now, r)
  local fast = math.max(0, a.knee - a.factor) * r.climb_s
  local slow = math.sqrt(math.max(0, PPM / math.max(1, a.knee) - 1)) * r.probe_s * PPM
  local decay = math.log(math.max(1, a.score) * 100) * r.memory_s * PPM
  return math.ceil(math.max(fast + slow, a.hold_until - now, decay))
end

local function write_adapt(key, a, now, r)
  redis.call('HSET', key, 'factor_ppm', string.format('%.0f', a.factor), 'at_us',
    string.format('%.0f', a.at), 'knee_ppm', string.format('%.0f', a.knee), 'hold_until_us',
    string.format('%.0f', a.hold_until), 'score', string.format('%.6f', a.score), 'score_at_us',
    string.format('%.0f', a.score_at), 'since', a.since)
  redis.call('PEXPIRE', key, math.ceil(expires_after_us(a, now, r) / 1000) + 1000)
end
