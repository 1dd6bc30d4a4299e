-- A fleet-wide circuit breaker per provider, in one hash `{b}:breaker:<provider>`:
-- state (closed | open | half_open), failures (consecutive), until (ms: open until / probe until),
-- and one breaker per organisation in the same hash: `of:<org>` (its consecutive failures),
-- `ou:<org>` (open until, ms) and `ol:<org>` (its last failure, ms).
-- KEYS[1] base. ARGV: op, provider, threshold, cooldown_ms, probe_ms, org ("" for none).
-- op "admit":   returns {1} when a call may go ({1, 1} when it is the half-open probe), or
--               {0, wait_ms} when the provider is paused (a 429's Retry-After), {0, wait_ms, 1}
--               when a breaker holds it back:
--               the organisation's own first (so a probe is never handed to a job that its
--               organisation's breaker then holds back), then the provider's. Open past its
--               cooldown, the provider's turns half-open and admits one probe call.
-- op "peek":    "admit" without taking anything: {1, 1} when the half-open probe is free to
--               take (a job checks every other gate and its budget first, then admits).
-- op "release": a probe that was granted but never made: the next admit may probe at once.
-- op "success": closes the provider's breaker and the organisation's. Returns {1}.
-- op "failure": counts a provider fault. The organisation's breaker opens at the threshold;
--               the provider's only when the consecutive faults come from at least two
--               organisations that failed within the cooldown (one tenant's timeouts must not
--               hold back everyone), or at once when a half-open probe failed. Returns {1} when
--               this failure opened the provider's breaker, {2} when only the organisation's.
-- op "pause":   a rate limit with a Retry-After: no call to the provider from any process for
--               ARGV[5] ms (a longer pause already set stands). Returns {1}.
local base = KEYS[1]
local op, provider = ARGV[1], ARGV[2]
local threshold, cooldown, probe = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local org = ARGV[6] or ""
local key = base .. ":breaker:" .. provider
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call("HGET", key, "state") or "closed"
local untl = tonumber(redis.call("HGET", key, "until") or "0") or 0

local paused = tonumber(redis.call("HGET", key, "paused_until") or "0") or 0
if op == "pause" then
  if now + probe > paused then redis.call("HSET", key, "paused_until", now + probe) end
  return { 1 }
end
if op == "admit" or op == "peek" then
  if paused > now then return { 0, paused - now } end
  if org ~= "" then
    local own = tonumber(redis.call("HGET", key, "ou:" .. org) or "0") or 0
    if own > now then return { 0, own - now, 1 } end
  end
  if state == "closed" then return { 1 } end
  -- While a probe is out, look again within a second: its success closes the breaker.
  if now < untl and state == "half_open" then return { 0, math.min(untl - now, 1000), 1 } end
  if now < untl then return { 0, untl - now, 1 } end
  -- Cooldown over (or a probe that never reported): let one probe through.
  if op == "peek" then return { 1, 1 } end
  redis.call("HSET", key, "state", "half_open", "until", now + probe)
  return { 1, 1 }
elseif op == "release" then
  -- The job given the probe made no call (a limit held it back): the next job may probe now.
  if state == "half_open" then redis.call("HSET", key, "until", now) end
  return { 1 }
elseif op == "success" then
  redis.call("HSET", key, "state", "closed", "failures", 0, "until", 0)
  if org ~= "" then redis.call("HDEL", key, "of:" .. org, "ou:" .. org, "ol:" .. org) end
  return { 1 }
else
  local opened_own = false
  if org ~= "" then
    redis.call("HSET", key, "ol:" .. org, now)
    local own = redis.call("HINCRBY", key, "of:" .. org, 1)
    if own >= threshold then
      redis.call("HSET", key, "ou:" .. org, now + cooldown, "of:" .. org, 0)
      opened_own = true
    end
  end
  local failures = redis.call("HINCRBY", key, "failures", 1)
  if state == "half_open" then
    redis.call("HSET", key, "state", "open", "until", now + cooldown, "opened_at", now)
    redis.call("HINCRBY", key, "opened", 1)
    return { 1 }
  end
  if state == "closed" and failures >= threshold then
    -- Organisations that failed within the cooldown; older entries are dropped. A failure
    -- with no organisation counts as one of its own.
    local orgs = (org == "") and 1 or 0
    local fields = redis.call("HGETALL", key)
    for i = 1, #fields, 2 do
      local f = fields[i]
      if string.sub(f, 1, 3) == "ol:" then
        if (tonumber(fields[i + 1]) or 0) >= now - cooldown then
          orgs = orgs + 1
        else
          local o = string.sub(f, 4)
          redis.call("HDEL", key, "ol:" .. o, "of:" .. o, "ou:" .. o)
        end
      end
    end
    if orgs >= 2 then
      redis.call("HSET", key, "state", "open", "until", now + cooldown, "opened_at", now)
      redis.call("HINCRBY", key, "opened", 1)
      return { 1 }
    end
  end
  if opened_own then return { 2 } end
  return { 0 }
end
