-- A fleet-wide circuit breaker per provider, in one hash `{b}:breaker:<provider>`:
-- state (closed | open | half_open), failures (consecutive), until (ms: open until / probe until).
-- KEYS[1] base. ARGV: op, provider, threshold, cooldown_ms, probe_ms.
-- op "admit":   returns {1} when a call may go, or {0, wait_ms} when the breaker holds it back.
--               Open past its cooldown turns half-open and admits one probe call.
-- op "success": closes the breaker. Returns {1}.
-- op "failure": counts a provider fault; opens the breaker at the threshold, or at once when a
--               half-open probe failed. Returns {1} when this failure opened it, else {0}.
-- op "pause":   a rate limit with a Retry-After: no call to the provider from any process for
--               ARGV[5] ms (a longer pause already set stands). Returns {1}.
local base = KEYS[1]
local op, provider = ARGV[1], ARGV[2]
local threshold, cooldown, probe = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local key = base .. ":breaker:" .. provider
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call("HGET", key, "state") or "closed"
local untl = tonumber(redis.call("HGET", key, "until") or "0")

local paused = tonumber(redis.call("HGET", key, "paused_until") or "0")
if op == "pause" then
  if now + probe > paused then redis.call("HSET", key, "paused_until", now + probe) end
  return { 1 }
end
if op == "admit" then
  if paused > now then return { 0, paused - now } end
  if state == "closed" then return { 1 } end
  -- While a probe is out, look again within a second: its success closes the breaker.
  if now < untl and state == "half_open" then return { 0, math.min(untl - now, 1000) } end
  if now < untl then return { 0, untl - now } end
  -- Cooldown over (or a probe that never reported): let one probe through.
  redis.call("HSET", key, "state", "half_open", "until", now + probe)
  return { 1 }
elseif op == "success" then
  redis.call("HSET", key, "state", "closed", "failures", 0, "until", 0)
  return { 1 }
else
  local failures = redis.call("HINCRBY", key, "failures", 1)
  if state == "half_open" or (state == "closed" and failures >= threshold) then
    redis.call("HSET", key, "state", "open", "until", now + cooldown, "opened_at", now)
    redis.call("HINCRBY", key, "opened", 1)
    return { 1 }
  end
  return { 0 }
end
