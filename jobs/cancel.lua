-- aiq cancel: takes a waiting or delayed job out of an aiq queue, from any language.
--
-- EVALSHA <sha> 1 <base> <job_id>
--
-- KEYS[1]  base: the queue's hash tag, "{" .. prefix .. "}", e.g. "{aiq}" (as for enqueue.lua)
-- ARGV[1]  job_id: the id enqueue.lua returned (or the app's own id)
--
-- Returns one of:
--   "cancelled"  the job was waiting or delayed: it left its queue and will never run; its
--                event `cancelled` is appended, its outcome kept, and the daemon writes its
--                ai_processing_results row (status cancelled) and then removes the job's hash
--   "running"    a worker holds it: it is not touched and finishes
--   "finished"   it succeeded, failed, is dead, or was cancelled already
--   "not_found"  no job of that id is known to Redis
-- Errors are replies starting with "ERR aiq:" naming the argument; nothing is written then.
-- Atomic and bounded: a waiting job leaves its organisation's list with one LREM (it scans that
-- one list up to the job), the organisation's ring entry and head time are kept right, and the
-- tier's depth goes down by one.

local base, job_id = KEYS[1], ARGV[1]

local function refuse(msg) return redis.error_reply("ERR aiq: " .. msg) end

if type(base) ~= "string" or #base > 130 or not string.find(base, "^{[\33-\122\124\126]+}$") then
  return refuse("base must be {prefix}: 1-128 printable ASCII characters without spaces or braces, in braces")
end
if type(job_id) ~= "string" or #job_id == 0 or #job_id > 128 or string.find(job_id, "[%s{}%z\1-\31\127]") then
  return refuse("job_id must be 1-128 bytes without spaces, braces or control characters")
end
if #ARGV ~= 1 then return refuse("cancel takes exactly one argument, the job id") end

local job = base .. ":job:" .. job_id
local f = redis.pcall("HMGET", job, "state", "tier", "org", "kind", "attempts", "ready_at",
  "delay_reason")
if type(f) == "table" and f.err then
  -- Not a hash (written by hand): the daemon buries it when it meets it.
  return "finished"
end
local state, tier, org, kind, attempts, ready = f[1], f[2], f[3], f[4], f[5], f[6]
if not state then
  if redis.call("EXISTS", base .. ":outcome:" .. job_id, base .. ":done:" .. job_id) > 0 then
    return "finished"
  end
  return "not_found"
end
if state == "inflight" then return "running" end
if state ~= "waiting" and state ~= "delayed" then return "finished" end

local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Shared keys are read and written with pcall: one of the wrong type (an app wrote it by hand)
-- is left for the daemon's repair scan, never a reason to stop half-way.
local function try(...)
  local r = redis.pcall(...)
  if type(r) == "table" and r.err then
    redis.pcall("HSET", base .. ":repair", string.sub(select(2, ...), #base + 2), now)
    return nil
  end
  return r
end

if state == "waiting" then
  local list = base .. ":wait:" .. tostring(tier) .. ":" .. tostring(org)
  local was_head = try("LINDEX", list, 0) == job_id
  local removed = try("LREM", list, 1, job_id)
  if removed == 1 then
    try("HINCRBY", base .. ":depth", tostring(tier), -1)
    local heads = base .. ":heads:" .. tostring(tier)
    local next_id = try("LINDEX", list, 0)
    if not next_id then
      -- The organisation has nothing left waiting in this tier.
      try("LREM", base .. ":orgs:" .. tostring(tier), 1, tostring(org))
      try("ZREM", heads, tostring(org))
    elseif was_head then
      local r = tonumber(redis.pcall("HGET", base .. ":job:" .. next_id, "ready_at"))
      try("ZADD", heads, r or now, tostring(org))
    end
  end
elseif try("ZREM", base .. ":delayed", job_id) == 1 then
  -- The delayed jobs per tier and reason ({p}:held, kept as guard.lua's g_held keeps it).
  local REASON = { scheduled = true, retry = true, budget = true, org_rate = true,
    provider_rate = true, provider_paused = true, breaker = true, org_in_flight = true,
    unavailable = true, other = true }
  local reason = f[7]
  if not REASON[reason] then reason = "other" end
  local field = "delayed:" .. tostring(tier) .. ":" .. reason
  local left = try("HINCRBY", base .. ":held", field, -1)
  if left and left <= 0 then redis.pcall("HDEL", base .. ":held", field) end
end

redis.call("HSET", job, "state", "cancelled", "outcome", "cancelled", "finished_at", now)
redis.call("HDEL", job, "due_at", "delay_reason")
local out = base .. ":outcome:" .. job_id
redis.pcall("DEL", out)
redis.pcall("HSET", out, "state", "cancelled", "org", org or "", "tier", tier or "",
  "kind", kind or "", "attempts", attempts or 0, "finished_at", now, "error", "", "result", "")
try("ZADD", base .. ":outcomes", now, job_id)
try("ZADD", base .. ":cancelled", now, job_id)
try("HINCRBY", base .. ":counters", "cancelled", 1)
-- Jobs per minute by event type (guard.lua's G_min), kept two hours.
local minute = base .. ":minute:" .. math.floor(now / 60000)
if try("HINCRBY", minute, "cancelled", 1) then redis.pcall("PEXPIRE", minute, 7200000) end

local cfg = redis.pcall("HMGET", base .. ":config", "events", "events_max_len", "events_max_age_ms")
if type(cfg) ~= "table" or cfg.err then cfg = {} end
if cfg[1] ~= "off" then
  local function int(v, default, lo, hi)
    local n = tonumber(v)
    if not n or n ~= math.floor(n) or n < lo or n > hi then return default end
    return n
  end
  local stream = base .. ":events"
  if try("XADD", stream, "MAXLEN", "~", int(cfg[2], 1000000, 1, 1e11), "*", "type", "cancelled",
      "job_id", job_id, "org", org or "", "tier", tier or "", "kind", kind or "",
      "state", "cancelled", "at", now, "attempts", attempts or 0) then
    redis.pcall("XTRIM", stream, "MINID", "~", now - int(cfg[3], 86400000, 1000, 1e12))
    try("HINCRBY", base .. ":counters", "events", 1)
  end
end
return "cancelled"
