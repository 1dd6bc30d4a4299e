-- Lease up to `want` jobs, fairly across tiers; first return expired leases and promote due
-- delayed jobs, each in a bounded batch. With want = 0 it only does the upkeep (the reaper).
-- All keys derive from KEYS[1], the queue's hash tag.
--
-- ARGV: want, lease_ms, strict (0|1), max_interrupts, reap_limit, promote_limit,
--       then the six tier weights, highest tier first.
-- Returns one array per leased job:
--   { id, token, kind, tier, org, payload, attempts, max_attempts, enqueued_at, interrupts, own }
-- (own: "1" when the app chose the id). Values are bytes as stored: the caller checks that they
-- are UTF-8 and buries a job whose bytes are not.

local base = KEYS[1]
local want, lease_ms, strict = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == "1"
local max_interrupts, reap_limit, promote_limit = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local TIERS = { "enterprise_plus", "enterprise", "professional_agency", "growth_team",
                "solo_professional", "trial" }
local weights = {}
for i = 1, 6 do weights[i] = tonumber(ARGV[6 + i]) end

local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local inflight, delayed, dead = base .. ":inflight", base .. ":delayed", base .. ":dead"
local counters = base .. ":counters"

-- Make a job waiting again: at the head of its organisation's list (a returned job keeps its
-- place and its ready_at) or at the tail (a retried job, ready from now).
local function push(id, at_head)
  local job = base .. ":job:" .. id
  local tier, org, ready = unpack(redis.call("HMGET", job, "tier", "org", "ready_at"))
  if not tier then return end
  local list = base .. ":wait:" .. tier .. ":" .. org
  local ring, heads = base .. ":orgs:" .. tier, base .. ":heads:" .. tier
  if at_head then
    ready = tonumber(ready) or now
    if redis.call("LPUSH", list, id) == 1 then redis.call("LPUSH", ring, org) end
    redis.call("ZADD", heads, ready, org)
  else
    ready = now
    if redis.call("RPUSH", list, id) == 1 then
      redis.call("RPUSH", ring, org)
      redis.call("ZADD", heads, ready, org)
    end
  end
  redis.call("HINCRBY", base .. ":depth", tier, 1)
  redis.call("HSET", job, "state", "waiting", "ready_at", ready)
end

-- 1. Leases whose deadline passed: the worker died or stalled. The job goes back to the head of
--    its tier without spending an attempt; one interrupted too often goes to the dead set.
for _, id in ipairs(redis.call("ZRANGEBYSCORE", inflight, "-inf", now, "LIMIT", 0, reap_limit)) do
  redis.call("ZREM", inflight, id)
  local job = base .. ":job:" .. id
  if redis.call("EXISTS", job) == 1 then
    redis.call("HINCRBY", job, "token", 1)
    redis.call("HINCRBY", counters, "interrupted", 1)
    local n = redis.call("HINCRBY", job, "interrupts", 1)
    if n >= max_interrupts then
      redis.call("HSET", job, "state", "dead", "dead_at", now,
        "dead_reason", "interrupted " .. n .. " times: its worker stopped before finishing it")
      redis.call("ZADD", dead, now, id)
      redis.call("HINCRBY", counters, "dead", 1)
    else
      push(id, true)
    end
  end
end

-- 2. Delayed jobs that are due.
for _, id in ipairs(redis.call("ZRANGEBYSCORE", delayed, "-inf", now, "LIMIT", 0, promote_limit)) do
  redis.call("ZREM", delayed, id)
  push(id, false)
end

if want <= 0 then return {} end

-- 3. Pick. Fair mode is stride scheduling: each tier has a pass value; the non-empty tier with
--    the smallest pass goes next and its pass grows by STRIDE / weight. A tier that was idle
--    starts from the current virtual time, so it cannot bank credit while it had no work.
local sched = base .. ":sched"
local STRIDE = 1000000
local pass = {}
local vt = tonumber(redis.call("HGET", sched, "vt") or "0")
for i = 1, 6 do
  pass[i] = tonumber(redis.call("HGET", sched, "pass:" .. TIERS[i]) or "0")
end

-- Which tiers have work: read once, then kept up to date as organisations leave their ring.
local rings, has_work = {}, {}
for i = 1, 6 do
  rings[i] = base .. ":orgs:" .. TIERS[i]
  has_work[i] = redis.call("LLEN", rings[i]) > 0
end

local out = {}
local leases = {}        -- ZADD arguments for the in-flight set, written once at the end
local taken = {}         -- jobs taken off each tier's depth
local guard = want * 4 + 16
while #out < want and guard > 0 do
  guard = guard - 1
  local best, best_pass = nil, nil
  for i = 1, 6 do
    if has_work[i] then
      if strict then best = i; break end
      local p = math.max(pass[i], vt)
      if best == nil or p < best_pass then best, best_pass = i, p end
    end
  end
  if best == nil then break end
  if not strict then
    pass[best] = best_pass + STRIDE / weights[best]
    vt = best_pass
  end
  local tier = TIERS[best]
  local ring, heads = rings[best], base .. ":heads:" .. tier
  -- Round-robin across organisations: take from the organisation at the head of the ring and
  -- move it to the back, or drop it when it has no more work.
  local org = redis.call("LMOVE", ring, ring, "LEFT", "RIGHT")
  local list = base .. ":wait:" .. tier .. ":" .. org
  local id = redis.call("LPOP", list)
  local next_id = redis.call("LINDEX", list, 0)
  if next_id then
    local ready = redis.call("HGET", base .. ":job:" .. next_id, "ready_at")
    redis.call("ZADD", heads, tonumber(ready) or now, org)
  else
    redis.call("RPOP", ring)
    redis.call("ZREM", heads, org)
    has_work[best] = redis.call("LLEN", ring) > 0
  end
  if id then
    taken[tier] = (taken[tier] or 0) + 1
    local job = base .. ":job:" .. id
    local f = redis.call("HMGET", job, "kind", "tier", "org", "payload", "attempts",
      "max_attempts", "enqueued_at", "interrupts", "own")
    if f[1] then
      local token = redis.call("HINCRBY", job, "token", 1)
      redis.call("HSET", job, "state", "inflight", "leased_at", now)
      leases[#leases + 1] = now + lease_ms
      leases[#leases + 1] = id
      out[#out + 1] = { id, tostring(token), f[1] or "", f[2] or "", f[3] or "", f[4] or "",
        tostring(f[5] or "0"), tostring(f[6] or "0"), tostring(f[7] or "0"), tostring(f[8] or "0"),
        f[9] or "0" }
    end
  end
end

for tier, n in pairs(taken) do redis.call("HINCRBY", base .. ":depth", tier, -n) end
if #leases > 0 then redis.call("ZADD", inflight, unpack(leases)) end

if not strict then
  for i = 1, 6 do redis.call("HSET", sched, "pass:" .. TIERS[i], pass[i]) end
  redis.call("HSET", sched, "vt", vt)
end
if #out > 0 then redis.call("HINCRBY", counters, "leased", #out) end
return out
