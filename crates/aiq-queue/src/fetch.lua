-- Lease up to `want` jobs, fairly across tiers; first return expired leases and promote due
-- delayed jobs, each in a bounded batch. With want = 0 it only does the upkeep (the reaper).
-- All keys derive from KEYS[1], the queue's hash tag. guard.lua is prepended: a key of the wrong
-- type or a job hash that is not what enqueue.lua wrote never stops the script half-way.
--
-- ARGV: want, lease_ms, strict (0|1), max_interrupts, reap_limit, promote_limit,
--       then the six tier weights, highest tier first, then the six tiers' default caps on an
--       organisation's leased jobs (0: no cap), in the same order.
-- The cap is fleet-wide: {p}:org_inflight counts each organisation's leased jobs (up here when a
-- job is leased, down by one wherever its lease ends: settle of any kind, the reaper below, a
-- burial), and {p}:org_limits holds the operator's overrides (org -> cap, 0: none), written by
-- the daemon from PostgreSQL. An organisation at its cap is passed over without leasing.
-- Returns one array per leased job:
--   { id, token, kind, tier, org, payload, attempts, max_attempts, enqueued_at, interrupts }
-- Values are bytes as stored: the caller checks that they are UTF-8 and buries a job whose bytes
-- are not.

local base = KEYS[1]
local want, lease_ms, strict = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == "1"
local max_interrupts, reap_limit, promote_limit = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local TIERS = { "enterprise_plus", "enterprise", "professional_agency", "growth_team",
                "solo_professional", "trial" }
local TIER = {}
for i = 1, 6 do TIER[TIERS[i]] = true end
local weights = {}
for i = 1, 6 do weights[i] = tonumber(ARGV[6 + i]) end

local now = G_now
local inflight, delayed, dead = base .. ":inflight", base .. ":delayed", base .. ":dead"
local counters = base .. ":counters"

-- Make a job waiting again: at the head of its organisation's list (a returned job keeps its
-- place and its ready_at) or at the tail (a retried job, ready from now).
local function push(id, at_head)
  local job = base .. ":job:" .. id
  local f, err = job_op("HMGET", job, "tier", "org", "ready_at")
  if not f then return bury(id, "its hash cannot be read: " .. err) end
  local tier, org, ready = f[1], f[2], f[3]
  if not tier then return end
  if not TIER[tier] or not org then return bury(id, "its tier or organisation is missing or unknown") end
  local list = base .. ":wait:" .. tier .. ":" .. org
  local ring, heads = base .. ":orgs:" .. tier, base .. ":heads:" .. tier
  if at_head then
    ready = tonumber(ready) or now
    if put("LPUSH", list, id) == 1 then put("LPUSH", ring, org) end
    put("ZADD", heads, ready, org)
  else
    ready = now
    if put("RPUSH", list, id) == 1 then
      put("RPUSH", ring, org)
      put("ZADD", heads, ready, org)
    end
  end
  put("HINCRBY", base .. ":depth", tier, 1)
  redis.call("HSET", job, "state", "waiting", "ready_at", ready)
  if not at_head then redis.call("HDEL", job, "due_at", "delay_reason") end
  return tier, org
end

-- 1. Leases whose deadline passed: the worker died or stalled. The job goes back to the head of
--    its tier without spending an attempt; one interrupted too often goes to the dead set.
for _, id in ipairs(get("ZRANGEBYSCORE", inflight, "-inf", now, "LIMIT", 0, reap_limit) or {}) do
  put("ZREM", inflight, id)
  local job = base .. ":job:" .. id
  if redis.call("EXISTS", job) == 1 then
    -- Its lease ended: its organisation and its tier have one job fewer in flight.
    local was = redis.pcall("HMGET", job, "org", "tier")
    if not g_failed(was) then
      g_leave(was[1], 1)
      g_held("inflight", was[2], -1)
    end
    local token, err = job_op("HINCRBY", job, "token", 1)
    local n
    if token then n, err = job_op("HINCRBY", job, "interrupts", 1) end
    if not n then
      bury(id, "its token or interrupt count is not a number: " .. err)
    else
      put("HINCRBY", counters, "interrupted", 1)
      local f = redis.call("HMGET", job, "org", "tier", "kind", "attempts")
      if n >= max_interrupts then
        local reason = "interrupted " .. n .. " times: its worker stopped before finishing it"
        redis.call("HSET", job, "state", "dead", "dead_at", now, "dead_reason", reason,
          "outcome", "dead")
        dead_enter(job, reason)
        put("ZADD", dead, now, id)
        g_held("dead", f[2], 1)
        put("HINCRBY", counters, "dead", 1)
        event("dead", id, f[1], f[2], f[3], "dead", f[4], "error", reason)
        outcome(id, "dead", f[1], f[2], f[3], f[4], reason, "")
        -- No handler saw it die: the daemon writes its result row from here.
        put("ZADD", base .. ":buried", now, id)
      elseif push(id, true) then
        event("interrupted", id, f[1], f[2], f[3], "waiting", f[4])
      end
    end
  end
end

-- 2. Delayed jobs that are due.
for _, id in ipairs(get("ZRANGEBYSCORE", delayed, "-inf", now, "LIMIT", 0, promote_limit) or {}) do
  if put("ZREM", delayed, id) == 1 then
    local was = redis.pcall("HMGET", base .. ":job:" .. id, "tier", "delay_reason")
    if not g_failed(was) then g_held("delayed", was[1], -1, was[2]) end
  end
  push(id, false)
end

if want <= 0 then
  g_finish()
  return {}
end

-- 3. Pick. Fair mode is stride scheduling: each tier has a pass value; the non-empty tier with
--    the smallest pass goes next and its pass grows by STRIDE / weight. A tier that was idle
--    starts from the current virtual time, so it cannot bank credit while it had no work.
local sched = base .. ":sched"
local STRIDE = 1000000
local pass = {}
local s = get("HMGET", sched, "vt", "pass:" .. TIERS[1], "pass:" .. TIERS[2], "pass:" .. TIERS[3],
  "pass:" .. TIERS[4], "pass:" .. TIERS[5], "pass:" .. TIERS[6]) or {}
local vt = tonumber(s[1]) or 0
for i = 1, 6 do pass[i] = tonumber(s[i + 1]) or 0 end

-- Which tiers have work: read once, then kept up to date as organisations leave their ring.
local rings, has_work, ring_len = {}, {}, {}
for i = 1, 6 do
  rings[i] = base .. ":orgs:" .. TIERS[i]
  ring_len[i] = get("LLEN", rings[i]) or 0
  has_work[i] = ring_len[i] > 0
end

-- The caps. With no tier default and no override there is nothing to check, only to count.
local org_inflight, org_limits = base .. ":org_inflight", base .. ":org_limits"
local caps, checking = {}, (get("HLEN", org_limits) or 0) > 0
local overrides = checking
for i = 1, 6 do
  caps[i] = tonumber(ARGV[12 + i]) or 0
  if caps[i] > 0 then checking = true end
end
local running = {}       -- org -> its leased jobs: Redis's count plus this call's leases
local cap_of = {}        -- tier .. org -> its cap (0: none)
local function count_of(org)
  local n = running[org]
  if n == nil then
    n = tonumber(redis.pcall("HGET", org_inflight, org)) or 0
    running[org] = n
  end
  return n
end
local function at_cap(i, org)
  local k = i .. org
  local cap = cap_of[k]
  if cap == nil then
    cap = caps[i]
    if overrides then
      local o = tonumber(redis.pcall("HGET", org_limits, org))
      if o and o >= 0 then cap = math.floor(o) end
    end
    cap_of[k] = cap
  end
  return cap > 0 and count_of(org) >= cap
end
-- An organisation at its cap is moved to the back of its ring, as after a turn it could not
-- use, and the next one is tried. A tier whose every organisation is at its cap has no work for
-- this call, so the stride goes to the other tiers. At most MAX_SKIPS organisations are passed
-- over per call (bounded work however many are at their caps); once they are used up, a tier
-- whose next organisation is at its cap has no work for this call either, and that organisation
-- keeps its place.
local MAX_SKIPS = 32
local skips = 0

local out = {}
local leases = {}        -- ZADD arguments for the in-flight set, written once at the end
local taken = {}         -- jobs taken off each tier's depth
local leased_by = {}     -- org -> jobs leased by this call
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
  local tier = TIERS[best]
  local ring, heads = rings[best], base .. ":heads:" .. tier
  -- Round-robin across organisations: take from the organisation at the head of the ring and
  -- move it to the back, or drop it when it has no more work.
  -- The hot path calls redis.pcall itself (a reply that is a table here is an error) and goes
  -- through guard.lua's helpers only when something is wrong.
  local org, passed = nil, 0
  while true do
    if checking and skips >= MAX_SKIPS then
      -- No passes left: an organisation at its cap keeps its place at the head.
      local head = redis.pcall("LINDEX", ring, 0)
      if type(head) == "string" and at_cap(best, head) then
        org = false
        break
      end
    end
    org = redis.pcall("LMOVE", ring, ring, "LEFT", "RIGHT")
    if type(org) == "table" then org = get("LMOVE", ring, ring, "LEFT", "RIGHT") end
    if not org or not checking or not at_cap(best, org) then break end
    passed, skips = passed + 1, skips + 1
    if passed >= ring_len[best] or skips >= MAX_SKIPS then
      org = false
      break
    end
  end
  if not org then
    -- An empty ring (counted as having work by a stale LLEN), one moved aside as corrupt, or
    -- every organisation of the tier at its cap.
    has_work[best] = false
  else
    if not strict then
      pass[best] = best_pass + STRIDE / weights[best]
      vt = best_pass
    end
    local list = base .. ":wait:" .. tier .. ":" .. org
    local id = redis.pcall("LPOP", list)
    if type(id) == "table" then id = get("LPOP", list) end
    local next_id = id and redis.call("LINDEX", list, 0)
    if next_id then
      local ready = redis.pcall("HGET", base .. ":job:" .. next_id, "ready_at")
      if type(redis.pcall("ZADD", heads, tonumber(ready) or now, org)) == "table" then
        put("ZADD", heads, tonumber(ready) or now, org)
      end
    else
      redis.call("RPOP", ring)
      put("ZREM", heads, org)
      ring_len[best] = get("LLEN", ring) or 0
      has_work[best] = ring_len[best] > 0
    end
    if id then
      taken[tier] = (taken[tier] or 0) + 1
      local job = base .. ":job:" .. id
      local f = redis.pcall("HMGET", job, "kind", "tier", "org", "payload", "attempts",
        "max_attempts", "enqueued_at", "interrupts", "revived")
      local token, err = nil, f.err
      if not err and f[1] then
        token = redis.pcall("HINCRBY", job, "token", 1)
        if type(token) == "table" then err = token.err end
      end
      if err then
        bury(id, "its hash cannot be leased: " .. err)
      elseif f[1] then
        redis.call("HSET", job, "state", "inflight", "leased_at", now)
        leases[#leases + 1] = now + lease_ms
        leases[#leases + 1] = id
        out[#out + 1] = { id, tostring(token), f[1] or "", f[2] or "", f[3] or "", f[4] or "",
          tostring(f[5] or "0"), tostring(f[6] or "0"), tostring(f[7] or "0"), tostring(f[8] or "0"),
          f[9] and "1" or "0" }
        event("started", id, f[3], f[2], f[1], "running", f[5])
        g_held("inflight", f[2], 1)
        -- Counted under the organisation its hash names, as every end of the lease is.
        local o = f[3] or ""
        leased_by[o] = (leased_by[o] or 0) + 1
        if checking then running[o] = count_of(o) + 1 end
      end
    end
  end
end

for tier, n in pairs(taken) do put("HINCRBY", base .. ":depth", tier, -n) end
if #leases > 0 then put("ZADD", inflight, unpack(leases)) end

if not strict then
  put("HSET", sched, "vt", vt, "pass:" .. TIERS[1], pass[1], "pass:" .. TIERS[2], pass[2],
    "pass:" .. TIERS[3], pass[3], "pass:" .. TIERS[4], pass[4], "pass:" .. TIERS[5], pass[5],
    "pass:" .. TIERS[6], pass[6])
end
if #out > 0 then put("HINCRBY", counters, "leased", #out) end
for o, n in pairs(leased_by) do put("HINCRBY", org_inflight, o, n) end
if skips > 0 then put("HINCRBY", counters, "capped", skips) end
g_finish()
return out
