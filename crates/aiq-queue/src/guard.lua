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

-- A job that cannot be handled as enqueue.lua wrote it goes to the dead set with the reason. A
-- job key of the wrong type is moved aside first; the fresh hash gets a token above any an old
-- lease could hold, so no late settle or renew of that lease applies.
local function bury(id, why)
  local job = G_base .. ":job:" .. id
  local t = redis.call("TYPE", job)
  t = type(t) == "table" and t.ok or t
  if t ~= "hash" and t ~= "none" then g_aside(job) end
  put("ZREM", G_base .. ":inflight", id)
  put("ZREM", G_base .. ":delayed", id)
  redis.call("HSET", job, "state", "dead", "dead_reason", "corrupt: " .. why,
    "last_error", "corrupt: " .. why, "dead_at", G_now, "token", G_now)
  if not get("ZSCORE", G_base .. ":dead", id) then dead_enter(job, "corrupt") end
  put("ZADD", G_base .. ":dead", G_now, id)
  put("HINCRBY", G_base .. ":counters", "dead", 1)
end
