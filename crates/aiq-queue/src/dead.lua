-- Operator actions on the dead set, for the given job ids (the caller pages through the set, so
-- each call is bounded). ARGV: op ("retry" | "purge"), then job ids.
-- retry: the job becomes waiting again at the tail of its tier with its attempts reset; a job
--        buried as corrupt whose hash lacks a known tier or organisation stays dead.
-- purge: the job is deleted.
-- A retried job's outcome ({p}:outcome:<id>) is removed, it is marked `revived` (its result row
-- that failed does not bury it again) and a `retried` event appended (state waiting, until now).
-- Returns one integer per id: 1 done, 0 not in the dead set (or not retryable).
-- guard.lua is prepended.
local base = KEYS[1]
local op = ARGV[1]
local now = G_now
local dead, counters = base .. ":dead", base .. ":counters"
local TIER = { enterprise_plus = true, enterprise = true, professional_agency = true,
               growth_team = true, solo_professional = true, trial = true }
local out = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  local job = base .. ":job:" .. id
  local f = op == "retry" and job_op("HMGET", job, "tier", "org") or nil
  if op == "retry" and redis.call("EXISTS", job) == 1 and not (f and TIER[f[1]] and f[2]) then
    out[#out + 1] = 0
  elseif put("ZREM", dead, id) == 0 then
    out[#out + 1] = 0
  elseif op == "purge" or redis.call("EXISTS", job) == 0 then
    g_held("dead", redis.pcall("HGET", job, "tier"), -1)
    dead_leave(job)
    redis.call("DEL", job)
    put("HINCRBY", counters, "purged", 1)
    out[#out + 1] = 1
  else
    local tier, org = f[1], f[2]
    g_held("dead", tier, -1)
    dead_leave(job)
    if not job_op("HINCRBY", job, "token", 1) then
      -- Not a number (written by hand): a fresh token above any an old lease could hold.
      redis.call("HSET", job, "token", now)
    end
    -- `revived`: a result row that says it failed for good is from before, not a reason to
    -- bury it again (the daemon runs it; a success replaces that row).
    redis.call("HSET", job, "attempts", 0, "interrupts", 0, "state", "waiting", "ready_at", now,
      "revived", 1)
    redis.call("HDEL", job, "dead_reason", "dead_at", "outcome", "due_at", "delay_reason")
    -- It is not finished any more: its outcome goes, and its event says it runs again.
    redis.pcall("DEL", base .. ":outcome:" .. id)
    put("ZREM", base .. ":outcomes", id)
    event("retried", id, org, tier, redis.call("HGET", job, "kind"), "waiting", 0, "until", now,
      "error", "requeued from the dead set")
    local list = base .. ":wait:" .. tier .. ":" .. org
    if put("RPUSH", list, id) == 1 then
      put("RPUSH", base .. ":orgs:" .. tier, org)
      put("ZADD", base .. ":heads:" .. tier, now, org)
    end
    put("HINCRBY", base .. ":depth", tier, 1)
    put("HINCRBY", counters, "revived", 1)
    out[#out + 1] = 1
  end
end
g_finish()
return out
