-- Settle leased jobs in one round trip. An item whose fencing token no longer matches (its lease
-- expired and the job went to another worker) is refused and changes nothing. guard.lua is
-- prepended: a corrupt key never stops the script half-way. Each applied item appends its event
-- to {p}:events (see guard.lua); a job that ends keeps its outcome in {p}:outcome:<id>.
--
-- ARGV: dead_max_jobs, dead_max_age_ms, done_ttl_s, dead_max_bytes, then groups of six: id,
--       token, op, delay_ms, message, reason.
-- op: done    - succeeded; the job leaves Redis (results live in PostgreSQL). A job enqueued with
--               the app's own id leaves a marker `{p}:done:<id>` for done_ttl_s, so enqueueing
--               that id again is a duplicate, not a second paid run. message: the result
--               summary (JSON text, stored as given) for the event and the outcome.
--     retry   - failed; one attempt spent; runs again after delay_ms
--     dead    - failed for good (attempts ran out); one attempt spent; kept in the dead set
--     failed  - no attempt can succeed; one attempt spent; kept in the dead set like dead
--     release - not started or interrupted by shutdown; back to the head of its tier, no attempt
--     defer   - not run (budget window, open breaker); runs again after delay_ms, no attempt;
--               reason: the delay reason (jobs/README.md), message: why, in words
-- Returns one integer per item: 1 applied, 0 refused (stale token or no lease; or the job's hash
-- was corrupt, and it was buried instead). Every item whose lease it ends takes one off its
-- organisation's count of leased jobs ({p}:org_inflight); a refused one changes nothing.

local base = KEYS[1]
local dead_max, dead_age, done_ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local dead_max_bytes = tonumber(ARGV[4])
local now = G_now
local inflight, delayed, dead = base .. ":inflight", base .. ":delayed", base .. ":dead"
local counters = base .. ":counters"
local COUNTER = { done = "done", retry = "retried", dead = "dead", failed = "dead", release = "released", defer = "deferred" }
local TIER = { enterprise_plus = true, enterprise = true, professional_agency = true,
               growth_team = true, solo_professional = true, trial = true }

-- The job's own numbers, bumped; false when its hash holds something that is not a number.
local function bump(job, id, ...)
  for _, field in ipairs({ ... }) do
    local _, err = job_op("HINCRBY", job, field, 1)
    if err then
      bury(id, "its " .. field .. " is not a number: " .. err)
      return false
    end
  end
  return true
end

local out = {}
local counts = {}
local left = {}          -- org -> leases this call ended, for {p}:org_inflight
for i = 5, #ARGV, 6 do
  local id, token, op, delay_ms, msg = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]), ARGV[i + 4]
  local reason = ARGV[i + 5]
  local job = base .. ":job:" .. id
  -- The hot path calls redis.pcall itself; guard.lua's helpers take over when a reply is an
  -- error.
  local held = redis.pcall("HGET", job, "token")
  local removed = held == token and redis.pcall("ZREM", inflight, id)
  if type(removed) == "table" then removed = put("ZREM", inflight, id) end
  if type(held) == "table" then
    bury(id, "its hash cannot be read: " .. held.err)
    out[#out + 1] = 0
  elseif held ~= token or removed == 0 then
    out[#out + 1] = 0
  else
    -- The lease ended (whatever the op, and even if the job is buried below).
    local was = redis.pcall("HMGET", job, "org", "tier")
    if g_failed(was) then was = {} end
    local o = was[1]
    if type(o) == "string" then left[o] = (left[o] or 0) + 1 end
    g_held("inflight", was[2], -1)
    local ok = true
    local f
    if op == "done" then
      f = redis.call("HMGET", job, "org", "tier", "kind", "attempts")
      redis.call("DEL", job)
      -- The app chose the id (the queue's own start with "j-"): remember that it finished.
      if string.byte(id, 1) ~= 106 or string.byte(id, 2) ~= 45 then
        redis.call("SET", base .. ":done:" .. id, 1, "EX", done_ttl)
      end
      event("succeeded", id, f[1], f[2], f[3], "succeeded", f[4], "result", msg)
      outcome(id, "succeeded", f[1], f[2], f[3], f[4], "", msg)
    elseif op == "retry" then
      ok = bump(job, id, "attempts", "token")
      if ok then
        local due = now + delay_ms
        redis.call("HSET", job, "state", "delayed", "last_error", msg, "due_at", due,
          "delay_reason", "retry")
        put("ZADD", delayed, due, id)
        f = redis.call("HMGET", job, "org", "tier", "kind", "attempts")
        g_held("delayed", f[2], 1, "retry")
        event("retried", id, f[1], f[2], f[3], "delayed", f[4], "until", due, "error", msg)
      end
    elseif op == "defer" then
      ok = bump(job, id, "token")
      if ok then
        local due = now + delay_ms
        redis.call("HSET", job, "state", "delayed", "deferred_reason", msg, "due_at", due,
          "delay_reason", reason)
        put("ZADD", delayed, due, id)
        f = redis.call("HMGET", job, "org", "tier", "kind", "attempts")
        g_held("delayed", f[2], 1, reason)
        event("deferred", id, f[1], f[2], f[3], "delayed", f[4], "reason", reason, "until", due,
          "message", msg)
      end
    elseif op == "dead" or op == "failed" then
      ok = bump(job, id, "attempts", "token")
      if ok then
        redis.call("HSET", job, "state", "dead", "dead_reason", msg, "last_error", msg, "dead_at", now,
          "outcome", op)
        dead_enter(job, msg)
        put("ZADD", dead, now, id)
        f = redis.call("HMGET", job, "org", "tier", "kind", "attempts")
        g_held("dead", f[2], 1)
        event(op, id, f[1], f[2], f[3], op, f[4], "error", msg)
        outcome(id, op, f[1], f[2], f[3], f[4], msg, "")
      end
    else -- release: back to the head of its organisation's list, keeping its place
      op = "release"
      ok = bump(job, id, "token")
      local tier, org, ready
      if ok then tier, org, ready = unpack(redis.call("HMGET", job, "tier", "org", "ready_at")) end
      if ok and (not TIER[tier] or not org) then
        bury(id, "its tier or organisation is missing or unknown")
        ok = false
      end
      if ok then
        local list = base .. ":wait:" .. tier .. ":" .. org
        if put("LPUSH", list, id) == 1 then put("LPUSH", base .. ":orgs:" .. tier, org) end
        put("ZADD", base .. ":heads:" .. tier, tonumber(ready) or now, org)
        put("HINCRBY", base .. ":depth", tier, 1)
        redis.call("HSET", job, "state", "waiting")
        f = redis.call("HMGET", job, "kind", "attempts")
        event("released", id, org, tier, f[1], "waiting", f[2])
      end
    end
    if ok then
      counts[op] = (counts[op] or 0) + 1
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  end
end
for op, n in pairs(counts) do put("HINCRBY", counters, COUNTER[op], n) end
for o, n in pairs(left) do g_leave(o, n) end

-- Keep the dead set within its caps (age, count, payload bytes), a bounded number of removals
-- per call: the oldest go first.
local function drop(ids)
  for _, id in ipairs(ids or {}) do
    if put("ZREM", dead, id) == 1 then
      local tier = redis.pcall("HGET", base .. ":job:" .. id, "tier")
      g_held("dead", tier, -1)
    end
    dead_leave(base .. ":job:" .. id)
    redis.call("DEL", base .. ":job:" .. id)
  end
end
drop(get("ZRANGEBYSCORE", dead, "-inf", now - dead_age, "LIMIT", 0, 100))
local excess = (get("ZCARD", dead) or 0) - dead_max
if excess > 0 then drop(get("ZRANGE", dead, 0, math.min(excess, 100) - 1)) end
local removed = 0
while removed < 100 and (tonumber(get("GET", base .. ":dead_bytes")) or 0) > dead_max_bytes do
  local oldest = get("ZRANGE", dead, 0, 0) or {}
  if #oldest == 0 then
    -- Nothing left to drop: the count drifted (a corrupt key); start it again.
    redis.call("SET", base .. ":dead_bytes", 0)
    break
  end
  drop(oldest)
  removed = removed + 1
end
g_finish()
return out
