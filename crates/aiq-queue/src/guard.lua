-- Prepended to each of the daemon's queue scripts (fetch, settle, renew, dead, repair). Redis
-- keeps the writes a script made before an error, so a script that stops half-way on a key of
-- the wrong type (an app that wrote the queue's keys by hand) can leave a job in no list and no
-- set. These helpers make every write that a corrupt key could refuse either succeed or be
-- handled on the spot:
--   * a shared key of the wrong type is moved aside to {p}:corrupt:<name>:<ms> (kept 7 days for
--     a look) and the write is made again on a fresh key;
--   * a counter field that is not an integer starts again from the increment;
--   * a job whose own hash cannot be read or written is buried: dead, reason "corrupt: ...";
-- and each of them asks for a repair scan ({p}:repair), which puts back into their lists and
-- sets the jobs whose list or set was moved aside and recounts the depth (repair.lua).

local G_base = KEYS[1]
local G_t = redis.call("TIME")
local G_now = tonumber(G_t[1]) * 1000 + math.floor(tonumber(G_t[2]) / 1000)

local function g_failed(r) return type(r) == "table" and r.err ~= nil end

-- Asks for a repair scan, naming what was moved aside or reset.
local function g_repair(what)
  redis.pcall("HSET", G_base .. ":repair", what, G_now)
end

local function g_aside(key)
  local name = string.sub(key, #G_base + 2)
  local dest = G_base .. ":corrupt:" .. name .. ":" .. G_now
  redis.call("RENAME", key, dest)
  redis.call("PEXPIRE", dest, 604800000)
  g_repair(name)
end

-- A write to a shared key (a list, set or hash of the queue, never a job's own hash).
local function put(...)
  local r = redis.pcall(...)
  if not g_failed(r) then return r end
  local cmd, key, field, n = ...
  if string.find(r.err, "WRONGTYPE", 1, true) then
    g_aside(key)
    return redis.call(...)
  end
  if string.find(r.err, "not an integer", 1, true) then
    -- A counter that is not a number starts again from this change.
    if cmd == "HINCRBY" then
      redis.call("HSET", key, field, n)
      g_repair(string.sub(key, #G_base + 2))
      return tonumber(n)
    elseif cmd == "INCRBY" or cmd == "DECRBY" then
      local v = cmd == "INCRBY" and tonumber(field) or 0
      redis.call("SET", key, v)
      g_repair(string.sub(key, #G_base + 2))
      return v
    end
  end
  return redis.call(...)
end

-- A read of a shared key: one of the wrong type is moved aside and reads as empty (nil).
local function get(...)
  local r = redis.pcall(...)
  if not g_failed(r) then return r end
  if string.find(r.err, "WRONGTYPE", 1, true) then
    g_aside(select(2, ...))
    return nil
  end
  return redis.call(...)
end

-- A read or write of a job's own hash: nil and the error when the hash cannot take it.
local function job_op(...)
  local r = redis.pcall(...)
  if g_failed(r) then return nil, r.err end
  return r
end

-- A job entering the dead set. The dead set is capped by payload bytes too ({p}:dead_bytes, see
-- settle.lua): a payload that can never run (invalid, corrupt) is kept as its first 4 KiB with
-- its length and SHA-1, and the bytes the job keeps are noted in it, to be taken off again when
-- it leaves the dead set (dead_leave).
local G_KEEP = 4096
local function dead_enter(job, reason)
  local payload = redis.pcall("HGET", job, "payload")
  if type(payload) ~= "string" then payload = "" end
  local keep = #payload
  if keep > G_KEEP and (string.find(reason, "^invalid payload") or string.find(reason, "^corrupt")) then
    redis.call("HSET", job, "payload", string.sub(payload, 1, G_KEEP), "payload_bytes", #payload,
      "payload_sha1", redis.sha1hex(payload), "payload_truncated", 1)
    keep = G_KEEP
  end
  redis.call("HSET", job, "dead_bytes", keep)
  put("INCRBY", G_base .. ":dead_bytes", keep)
end

local function dead_leave(job)
  local n = tonumber(redis.pcall("HGET", job, "dead_bytes")) or 0
  if n > 0 then
    put("DECRBY", G_base .. ":dead_bytes", n)
    redis.call("HDEL", job, "dead_bytes")
  end
end

-- Jobs outside the wait lists, per tier, for the console and /metrics: {p}:held, fields
-- `inflight:<tier>`, `delayed:<tier>:<reason>` and `dead:<tier>`, kept like {p}:depth is for
-- the waiting ones. Each script adds up its changes in G_held (g_held) and g_finish writes them,
-- one HINCRBY per field. A job whose tier is not one of the six is not counted (it leaves
-- uncounted too: its tier never changes); a delay reason outside the contract's list counts as
-- `other`, on the way in and out alike. A count that would go below zero (jobs that were in a
-- set before the counts were kept) is removed instead, so the counts heal as such jobs leave;
-- the readers show what the sets hold and the counts do not as unattributed.
local G_TIER = { enterprise_plus = true, enterprise = true, professional_agency = true,
                 growth_team = true, solo_professional = true, trial = true }
local G_REASON = { scheduled = true, retry = true, budget = true, org_rate = true,
                   provider_rate = true, provider_paused = true, breaker = true,
                   org_in_flight = true, unavailable = true, other = true }
local G_held, G_heldn = {}, 0

-- `set`: "inflight", "delayed" or "dead"; `reason`: the delay reason, for "delayed" only.
local function g_held(set, tier, n, reason)
  if type(tier) ~= "string" or not G_TIER[tier] then return end
  local field = set .. ":" .. tier
  if set == "delayed" then
    if type(reason) ~= "string" or not G_REASON[reason] then reason = "other" end
    field = field .. ":" .. reason
  end
  if G_held[field] == nil then G_heldn = G_heldn + 1 end
  G_held[field] = (G_held[field] or 0) + n
end

-- Jobs per minute by event type, for the console's last hour: {p}:minute:<minute since the
-- epoch>, a hash of event type -> count, kept two hours. Counted whether events are on or not.
local G_min, G_minn = {}, 0
local G_MINUTE_KEEP_MS = 7200000

-- Job events and outcomes (jobs/README.md, "Outcomes"). Each state change appends one entry to
-- the stream {p}:events in the script that makes the change; a job that reaches a final state
-- leaves its outcome in {p}:outcome:<id>, indexed by {p}:outcomes. {p}:config (written by the
-- daemon at start; an app may have written anything) is read once per call, on the first event
-- or outcome, each value bounded; without it events are on with the defaults.
local G_cfg = nil
local G_events, G_outcomes = 0, 0

local function g_int(v, default, lo, hi)
  local n = tonumber(v)
  if not n or n ~= math.floor(n) or n < lo or n > hi then return default end
  return n
end

local function g_config()
  if not G_cfg then
    local c = redis.pcall("HMGET", G_base .. ":config", "events", "events_max_len",
      "events_max_age_ms", "outcomes_max_age_ms", "outcomes_max_jobs")
    if g_failed(c) then c = {} end
    G_cfg = { on = c[1] ~= "off",
              max_len = g_int(c[2], 1000000, 1, 1e11),
              max_age = g_int(c[3], 86400000, 1000, 1e12),
              out_age = g_int(c[4], 86400000, 1000, 1e12),
              out_max = g_int(c[5], 100000, 1, 1e11) }
  end
  return G_cfg
end

-- This call's events, as columns: one list of values per field, in the order the events
-- happened. g_finish writes them as one stream entry (one XADD per call, whatever the batch):
-- an entry of one event is that event's fields; an entry of n > 1 events has the field `n` and
-- each field's n values joined by line feeds (a value's own line feeds become spaces), "" where
-- an event lacks the field. jobs/README.md, "Events", is the contract.
local G_ev, G_evn, G_evx = nil, 0, nil

local function g_flat(v)
  if v == nil then return "" end
  if type(v) ~= "string" then return tostring(v) end
  if string.find(v, "\n", 1, true) then return (string.gsub(v, "\n", " ")) end
  return v
end

-- Adds one event: its type, the job, the state after the change, then the type's own fields
-- (name, value, ...).
local function event(etype, id, org, tier, kind, state, attempts, ...)
  if G_min[etype] == nil then G_minn = G_minn + 1 end
  G_min[etype] = (G_min[etype] or 0) + 1
  local c = g_config()
  if not c.on then return end
  if not G_ev then
    G_ev = { type = {}, job_id = {}, org = {}, tier = {}, kind = {}, state = {}, at = {},
             attempts = {} }
    G_evx = {}
  end
  local n = G_evn + 1
  G_evn = n
  G_ev.type[n] = etype
  G_ev.job_id[n] = g_flat(id)
  G_ev.org[n] = g_flat(org)
  G_ev.tier[n] = g_flat(tier)
  G_ev.kind[n] = g_flat(kind)
  G_ev.state[n] = state
  G_ev.at[n] = G_now
  G_ev.attempts[n] = g_flat(attempts or 0)
  for i = 1, select("#", ...), 2 do
    local name, value = select(i, ...)
    local col = G_ev[name]
    if not col then
      col = {}
      G_ev[name] = col
      G_evx[#G_evx + 1] = name
    end
    col[n] = g_flat(value)
  end
end

-- Writes this call's events as one entry of {p}:events; returns how many it wrote.
local function g_write_events()
  local n = G_evn
  if n == 0 then return 0 end
  local stream = G_base .. ":events"
  local args = { "XADD", stream, "MAXLEN", "~", g_config().max_len, "*" }
  if n > 1 then args[7] = "n"; args[8] = n end
  local function field(name)
    local col = G_ev[name]
    args[#args + 1] = name
    if n == 1 then
      args[#args + 1] = col[1]
    else
      for i = 1, n do if col[i] == nil then col[i] = "" end end
      args[#args + 1] = table.concat(col, "\n", 1, n)
    end
  end
  field("type"); field("job_id"); field("org"); field("tier"); field("kind"); field("state")
  field("at"); field("attempts")
  for _, name in ipairs(G_evx) do field(name) end
  local r = redis.pcall(unpack(args))
  if g_failed(r) and string.find(r.err, "WRONGTYPE", 1, true) then
    g_aside(stream)
    r = redis.pcall(unpack(args))
  end
  if g_failed(r) then return 0 end
  return n
end

-- Keeps a finished job's outcome for the clients' status and wait.
local function outcome(id, state, org, tier, kind, attempts, err, result)
  local key = G_base .. ":outcome:" .. id
  local args = { "HSET", key, "state", state, "org", org or "", "tier", tier or "",
    "kind", kind or "", "attempts", attempts or 0, "finished_at", G_now, "error", err or "",
    "result", result or "" }
  if g_failed(redis.pcall(unpack(args))) then
    redis.pcall("DEL", key)
    redis.pcall(unpack(args))
  end
  put("ZADD", G_base .. ":outcomes", G_now, id)
  G_outcomes = G_outcomes + 1
end

-- What every script runs before it returns: writes the call's events (trimming the stream by
-- length), counts them, trims the stream by age and the outcomes by age and count, oldest first, at most as many as this call added plus
-- 100 (bounded, and never falling behind).
local function g_finish()
  if G_heldn > 0 then
    local key = G_base .. ":held"
    for field, n in pairs(G_held) do
      if n ~= 0 and (tonumber(put("HINCRBY", key, field, n)) or 0) <= 0 then
        redis.pcall("HDEL", key, field)
      end
    end
  end
  if G_minn > 0 then
    local key = G_base .. ":minute:" .. math.floor(G_now / 60000)
    for etype, n in pairs(G_min) do put("HINCRBY", key, etype, n) end
    redis.pcall("PEXPIRE", key, G_MINUTE_KEEP_MS)
  end
  G_events = g_write_events()
  if G_events > 0 then
    local c, stream = g_config(), G_base .. ":events"
    put("HINCRBY", G_base .. ":counters", "events", G_events)
    redis.pcall("XTRIM", stream, "MINID", "~", G_now - c.max_age)
  end
  if G_outcomes > 0 then
    local c, z = g_config(), G_base .. ":outcomes"
    local limit = G_outcomes + 100
    local function drop(ids)
      for _, id in ipairs(ids or {}) do
        redis.pcall("DEL", G_base .. ":outcome:" .. id)
        put("ZREM", z, id)
        limit = limit - 1
      end
    end
    drop(get("ZRANGEBYSCORE", z, "-inf", G_now - c.out_age, "LIMIT", 0, limit))
    local excess = (get("ZCARD", z) or 0) - c.out_max
    if excess > 0 and limit > 0 then drop(get("ZRANGE", z, 0, math.min(excess, limit) - 1)) end
  end
end

-- Leases that ended: `org` has n jobs fewer in flight ({p}:org_inflight, the fleet-wide cap that
-- fetch.lua keeps). A count that reaches zero (or went below it) is removed. An org that is not a
-- string (a job hash that could not be read) changes nothing: the renewer's recount (limits.lua)
-- puts such a drift right.
local function g_leave(org, n)
  if type(org) ~= "string" then return end
  local key = G_base .. ":org_inflight"
  local left = tonumber(put("HINCRBY", key, org, -n))
  if left and left <= 0 then redis.pcall("HDEL", key, org) end
end

-- A job that cannot be handled as enqueue.lua wrote it goes to the dead set with the reason. A
-- job key of the wrong type is moved aside first; the fresh hash gets a token above any an old
-- lease could hold, so no late settle or renew of that lease applies.
local function bury(id, why)
  local job = G_base .. ":job:" .. id
  local t = redis.call("TYPE", job)
  t = type(t) == "table" and t.ok or t
  local was = t == "hash" and redis.pcall("HMGET", job, "org", "tier", "delay_reason") or {}
  if g_failed(was) then was = {} end
  local org, tier = was[1], was[2]
  if t ~= "hash" and t ~= "none" then g_aside(job) end
  -- A buried job that was leased ends its lease.
  if put("ZREM", G_base .. ":inflight", id) == 1 then
    g_leave(org, 1)
    g_held("inflight", tier, -1)
  end
  if put("ZREM", G_base .. ":delayed", id) == 1 then g_held("delayed", tier, -1, was[3]) end
  redis.call("HSET", job, "state", "dead", "dead_reason", "corrupt: " .. why,
    "last_error", "corrupt: " .. why, "dead_at", G_now, "token", G_now, "outcome", "dead")
  if not get("ZSCORE", G_base .. ":dead", id) then
    dead_enter(job, "corrupt")
    g_held("dead", tier, 1)
  end
  put("ZADD", G_base .. ":dead", G_now, id)
  put("HINCRBY", G_base .. ":counters", "dead", 1)
  -- Whatever of the job's fields can still be read names it in its event.
  local f = redis.pcall("HMGET", job, "org", "tier", "kind", "attempts")
  if g_failed(f) then f = {} end
  local function text(v) return type(v) == "string" and v or "" end
  event("dead", id, text(f[1]), text(f[2]), text(f[3]), "dead", tonumber(f[4]) or 0,
    "error", "corrupt: " .. why)
  outcome(id, "dead", text(f[1]), text(f[2]), text(f[3]), tonumber(f[4]) or 0, "corrupt: " .. why, "")
  -- No handler saw it die: the daemon writes its result row from here.
  put("ZADD", G_base .. ":buried", G_now, id)
end
