-- Settle leased jobs in one round trip. An item whose fencing token no longer matches (its lease
-- expired and the job went to another worker) is refused and changes nothing.
--
-- ARGV: dead_max_jobs, dead_max_age_ms, done_ttl_s, then groups of five: id, token, op, delay_ms,
--       message.
-- op: done    - finished; the job leaves Redis (results live in PostgreSQL). A job enqueued with
--               the app's own id leaves a marker `{p}:done:<id>` for done_ttl_s, so enqueueing
--               that id again is a duplicate, not a second paid run.
--     retry   - failed; one attempt spent; runs again after delay_ms
--     dead    - failed for good; one attempt spent; kept in the dead set with the message
--     release - not started or interrupted by shutdown; back to the head of its tier, no attempt
--     defer   - not run (budget window, open breaker); runs again after delay_ms, no attempt
-- Returns one integer per item: 1 applied, 0 refused (stale token or no lease).

local base = KEYS[1]
local dead_max, dead_age, done_ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local inflight, delayed, dead = base .. ":inflight", base .. ":delayed", base .. ":dead"
local counters = base .. ":counters"
local COUNTER = { done = "done", retry = "retried", dead = "dead", release = "released", defer = "deferred" }

local out = {}
local counts = {}
for i = 4, #ARGV, 5 do
  local id, token, op, delay_ms, msg = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]), ARGV[i + 4]
  local job = base .. ":job:" .. id
  local held, own = unpack(redis.call("HMGET", job, "token", "own"))
  if held ~= token or redis.call("ZREM", inflight, id) == 0 then
    out[#out + 1] = 0
  else
    if op == "done" then
      redis.call("DEL", job)
      if own == "1" then redis.call("SET", base .. ":done:" .. id, 1, "EX", done_ttl) end
    elseif op == "retry" then
      redis.call("HINCRBY", job, "attempts", 1)
      redis.call("HINCRBY", job, "token", 1)
      redis.call("HSET", job, "state", "delayed", "last_error", msg)
      redis.call("ZADD", delayed, now + delay_ms, id)
    elseif op == "defer" then
      redis.call("HINCRBY", job, "token", 1)
      redis.call("HSET", job, "state", "delayed", "deferred_reason", msg)
      redis.call("ZADD", delayed, now + delay_ms, id)
    elseif op == "dead" then
      redis.call("HINCRBY", job, "attempts", 1)
      redis.call("HINCRBY", job, "token", 1)
      redis.call("HSET", job, "state", "dead", "dead_reason", msg, "last_error", msg, "dead_at", now)
      redis.call("ZADD", dead, now, id)
    else -- release: back to the head of its organisation's list, keeping its place
      op = "release"
      redis.call("HINCRBY", job, "token", 1)
      local tier, org, ready = unpack(redis.call("HMGET", job, "tier", "org", "ready_at"))
      local list = base .. ":wait:" .. tier .. ":" .. org
      if redis.call("LPUSH", list, id) == 1 then redis.call("LPUSH", base .. ":orgs:" .. tier, org) end
      redis.call("ZADD", base .. ":heads:" .. tier, tonumber(ready) or now, org)
      redis.call("HINCRBY", base .. ":depth", tier, 1)
      redis.call("HSET", job, "state", "waiting")
    end
    counts[op] = (counts[op] or 0) + 1
    out[#out + 1] = 1
  end
end
for op, n in pairs(counts) do redis.call("HINCRBY", counters, COUNTER[op], n) end

-- Keep the dead set within its caps, a bounded number of removals per call.
local function drop(ids)
  for _, id in ipairs(ids) do
    redis.call("ZREM", dead, id)
    redis.call("DEL", base .. ":job:" .. id)
  end
end
drop(redis.call("ZRANGEBYSCORE", dead, "-inf", now - dead_age, "LIMIT", 0, 100))
local excess = redis.call("ZCARD", dead) - dead_max
if excess > 0 then drop(redis.call("ZRANGE", dead, 0, math.min(excess, 100) - 1)) end
return out
