-- An organisation's purge (`aiq org purge`): removes its jobs from the queue, a bounded batch
-- per call. Removed jobs are gone, not cancelled: no event, no outcome, no result row; each adds
-- one to {p}:counters `purged`. A running job is never touched (it finishes, and the purge is
-- run again). guard.lua is prepended.
-- ARGV[1] op, ARGV[2] org, then:
--   "waiting", tier, limit: takes up to `limit` ids off the head of the organisation's list in
--     the tier, keeping the tier's depth, ring and heads right (as fetch.lua does when it takes
--     one). Returns { jobs removed, ids left in the list }.
--   "set", name (delayed | dead | cancelled), ids...: each id in {p}:<name> whose hash is of
--     `org` and in that state leaves the set and Redis. Returns { jobs removed }.
--   "outcomes", ids...: each finished job's outcome of `org` leaves {p}:outcome:<id> and
--     {p}:outcomes. Returns { outcomes removed }.
local base = KEYS[1]
local op, org = ARGV[1], ARGV[2]
local removed = 0

-- The job's hash, its kept answer and its idempotency key (if it still names this job) go.
local function forget(id, idem)
  redis.call("DEL", base .. ":job:" .. id, base .. ":kept:" .. id)
  if type(idem) == "string" and idem ~= "" then
    local k = base .. ":idem:" .. org .. ":" .. idem
    if redis.pcall("GET", k) == id then redis.call("DEL", k) end
  end
  removed = removed + 1
end

if op == "waiting" then
  local tier, limit = ARGV[3], tonumber(ARGV[4])
  local list = base .. ":wait:" .. tier .. ":" .. org
  local ids = get("LRANGE", list, 0, limit - 1) or {}
  if #ids > 0 then
    redis.call("LTRIM", list, #ids, -1)
    put("HINCRBY", base .. ":depth", tier, -#ids)
  end
  for _, id in ipairs(ids) do
    local f = job_op("HMGET", base .. ":job:" .. id, "org", "state", "idem")
    if f and f[1] == org and f[2] == "waiting" then forget(id, f[3]) end
  end
  local heads = base .. ":heads:" .. tier
  local next_id = get("LINDEX", list, 0)
  if next_id then
    local ready = tonumber(redis.pcall("HGET", base .. ":job:" .. next_id, "ready_at"))
    put("ZADD", heads, ready or G_now, org)
  elseif #ids > 0 then
    put("LREM", base .. ":orgs:" .. tier, 0, org)
    put("ZREM", heads, org)
  end
  if removed > 0 then put("HINCRBY", base .. ":counters", "purged", removed) end
  return { removed, get("LLEN", list) or 0 }
elseif op == "set" then
  local name = ARGV[3]
  local set = base .. ":" .. name
  for i = 4, #ARGV do
    local id = ARGV[i]
    local job = base .. ":job:" .. id
    local f = job_op("HMGET", job, "org", "state", "idem")
    if f and f[1] == org and f[2] == name and put("ZREM", set, id) == 1 then
      if name == "dead" then dead_leave(job) end
      forget(id, f[3])
    end
  end
  if removed > 0 then put("HINCRBY", base .. ":counters", "purged", removed) end
  return { removed }
elseif op == "outcomes" then
  for i = 3, #ARGV do
    local id = ARGV[i]
    local key = base .. ":outcome:" .. id
    if redis.pcall("HGET", key, "org") == org then
      redis.call("DEL", key)
      put("ZREM", base .. ":outcomes", id)
      removed = removed + 1
    end
  end
  return { removed }
end
return redis.error_reply("ERR aiq: org.lua: unknown op")
