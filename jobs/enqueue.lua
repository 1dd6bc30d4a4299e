-- aiq enqueue: the one way to put a job into an aiq queue, from any language.
--
-- EVALSHA <sha> 1 <base> <kind> <tier> <organization_id> <payload> <job_id> <delay_ms>
--         <idempotency_key> <idempotency_ttl_s> <max_attempts>
--
-- KEYS[1]  base: the queue's hash tag, "{" .. prefix .. "}", e.g. "{aiq}". Every key of the
--          queue starts with it, so the whole queue lives in one Redis Cluster slot.
-- ARGV[1]  kind: "vision.annotate" or "llm.complete"
-- ARGV[2]  tier: enterprise_plus | enterprise | professional_agency | growth_team |
--          solo_professional | trial
-- ARGV[3]  organization_id: the UUID the job is billed to, in canonical lower-case form
--          (also inside the payload)
-- ARGV[4]  payload: the job's JSON document (see jobs/schema/<kind>.json), UTF-8, at most 10 MiB
-- ARGV[5]  job_id: optional ("" = the queue assigns one, "j-<time><usec>-<n>"); an app's own id
--          may not start with "j-". An id that is queued, dead, or finished within the
--          idempotency TTL is a duplicate.
-- ARGV[6]  delay_ms: run no earlier than this many milliseconds from now ("0" = now), an integer
--          from 0 to 31536000000 (365 days)
-- ARGV[7]  idempotency_key: optional ("" = none), at most 200 bytes; scoped to the organisation
-- ARGV[8]  idempotency_ttl_s: how long the key is remembered, an integer from 1 to 31536000 when a
--          key is given (0 allowed without one)
-- ARGV[9]  max_attempts: executions before the dead set ("0" = the daemon's default), 0 to 100
--
-- Returns { job_id, "created" } or { first_job_id, "duplicate" }.
-- Errors are replies starting with "ERR aiq:" that name the argument; when one is returned,
-- nothing was written (not even the id counter): every check runs before the first write, and a
-- write refused by Redis (out of memory, say) is undone before the error is returned.

local base = KEYS[1]
local kind, tier, org, payload = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local job_id, delay_arg = ARGV[5], ARGV[6]
local idem_key, ttl_arg, attempts_arg = ARGV[7], ARGV[8], ARGV[9]

local TIERS = { enterprise_plus = true, enterprise = true, professional_agency = true,
                growth_team = true, solo_professional = true, trial = true }
local KINDS = { ["vision.annotate"] = true, ["llm.complete"] = true }

local function refuse(msg) return redis.error_reply("ERR aiq: " .. msg) end

-- A value shown in a refusal: printable ASCII, at most 40 characters, anything else escaped.
local function shown(s)
  if type(s) ~= "string" then return "(missing)" end
  local cut = string.sub(s, 1, 40)
  cut = string.gsub(cut, "[^\32-\126]", function(c) return string.format("\\x%02x", string.byte(c)) end)
  if #s > 40 then cut = cut .. "..." end
  return cut
end

-- Well-formed UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF). Each valid
-- multi-byte sequence is replaced by an ASCII placeholder (never removed, so no new sequence
-- can form across a gap); any byte >= 0x80 left over is invalid. Pure ASCII skips the work.
local function utf8_ok(s)
  if not string.find(s, "[\128-\255]") then return true end
  s = string.gsub(s, "[\194-\223][\128-\191]", "x")
  s = string.gsub(s, "\224[\160-\191][\128-\191]", "x")
  s = string.gsub(s, "[\225-\236\238\239][\128-\191][\128-\191]", "x")
  s = string.gsub(s, "\237[\128-\159][\128-\191]", "x")
  s = string.gsub(s, "\240[\144-\191][\128-\191][\128-\191]", "x")
  s = string.gsub(s, "[\241-\243][\128-\191][\128-\191][\128-\191]", "x")
  s = string.gsub(s, "\244[\128-\143][\128-\191][\128-\191]", "x")
  return not string.find(s, "[\128-\255]")
end

-- A decimal integer from lo to hi, written with digits only (no sign, point, exponent, inf, nan).
local function int_in(s, lo, hi)
  if s == "0" then return lo <= 0 and 0 or nil end
  if type(s) ~= "string" or #s > 15 or not string.find(s, "^%d+$") then return nil end
  local n = tonumber(s)
  if n < lo or n > hi then return nil end
  return n
end

if type(base) ~= "string" or #base > 130 or not string.find(base, "^{[\33-\122\124\126]+}$") then
  return refuse("base must be {prefix}: 1-128 printable ASCII characters without spaces or braces, in braces")
end
if not KINDS[kind] then return refuse("unknown kind " .. shown(kind)) end
if not TIERS[tier] then return refuse("unknown tier " .. shown(tier)) end
if type(org) ~= "string" or #org ~= 36 or not string.find(org,
    "^[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]%-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]%-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]%-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]%-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]$") then
  if type(org) == "string" and string.match(org, "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$") then
    return refuse("organization_id must be a UUID in lower case (" .. shown(org) .. ")")
  end
  return refuse("organization_id must be a UUID")
end
if type(payload) ~= "string" or #payload == 0 then return refuse("empty payload") end
if #payload > 10485760 then return refuse("payload larger than 10 MiB") end
-- One scan finds whether the payload is all printable ASCII (the common case); only a payload
-- that is not is checked byte by byte.
if string.find(payload, "[^\32-\126]") then
  if not utf8_ok(payload) then return refuse("payload is not valid UTF-8") end
  -- JSON allows no raw control character but tab, newline and carriage return (a NUL inside a
  -- string must be written \u0000, and the decoder refuses that too).
  if string.find(payload, "[%z\1-\8\11\12\14-\31]") then
    return refuse("payload holds a control character (JSON must escape them)")
  end
end
local delay_ms = int_in(delay_arg, 0, 31536000000)
if not delay_ms then
  if type(delay_arg) == "string" and string.find(delay_arg, "^%-") then
    return refuse("delay_ms must be >= 0")
  end
  return refuse("delay_ms must be an integer from 0 to 31536000000, not " .. shown(delay_arg))
end
local max_attempts = int_in(attempts_arg, 0, 100)
if not max_attempts then return refuse("max_attempts must be 0..100") end
if type(job_id) ~= "string" then return refuse("job_id is missing") end
if job_id ~= "" then
  if #job_id > 128 or string.find(job_id, "[%s{}]") then
    return refuse("job_id must be 1-128 characters without spaces or braces")
  end
  if string.find(job_id, "[%z\1-\31\127]") or not utf8_ok(job_id) then
    return refuse("job_id must be UTF-8 without control characters")
  end
  if string.sub(job_id, 1, 2) == "j-" then
    return refuse("job_id must not start with j- (the queue's own ids)")
  end
end
if type(idem_key) ~= "string" then return refuse("idempotency_key is missing") end
if idem_key ~= "" and (#idem_key > 200 or string.find(idem_key, "[%z\1-\31\127]") or not utf8_ok(idem_key)) then
  return refuse("idempotency_key must be 1-200 bytes of UTF-8 without control characters")
end
local idem_ttl = int_in(ttl_arg, idem_key == "" and 0 or 1, 31536000)
if not idem_ttl then
  if idem_key ~= "" then
    return refuse("idempotency_ttl_s must be > 0 with an idempotency key (an integer up to 31536000)")
  end
  return refuse("idempotency_ttl_s must be an integer from 0 to 31536000")
end

-- Writes, each undone if a later one is refused: Redis keeps a script's writes made before an
-- error, so without the undo a job could end up in no list at all. A shared key of the wrong type
-- (an app that wrote the queue's keys by hand) is moved aside to {p}:corrupt:<name>:<ms> and the
-- write made on a fresh key, and a counter field that is not a number starts again; both ask the
-- daemon for a repair scan ({p}:repair), which puts back the jobs the moved key held.
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seq_key, counters, delayed = base .. ":seq", base .. ":counters", base .. ":delayed"
local list = base .. ":wait:" .. tier .. ":" .. org
local ring, heads, depth = base .. ":orgs:" .. tier, base .. ":heads:" .. tier, base .. ":depth"
-- Which writes were made, to undo them in reverse on a refusal (flags: the common path
-- builds no table).
local did_seq, did_count, did_delayed, did_list, did_ring, did_heads = false, false, false, false, false, false
local function undo_all()
  if did_heads then redis.pcall("ZREM", heads, org) end
  if did_ring then redis.pcall("RPOP", ring) end
  if did_list then redis.pcall("RPOP", list) end
  if did_delayed then redis.pcall("ZREM", delayed, job_id) end
  if did_count then redis.pcall("HINCRBY", counters, "enqueued", -1) end
  if did_seq then redis.pcall("DECR", seq_key) end
end
local function flag(key)
  redis.pcall("HSET", base .. ":repair", string.sub(key, #base + 2), now)
end
local function aside(key)
  local dest = base .. ":corrupt:" .. string.sub(key, #base + 2) .. ":" .. now
  redis.pcall("RENAME", key, dest)
  redis.pcall("PEXPIRE", dest, 604800000)
end
-- A write Redis refused (r is its error): mend a corrupt key and make the write again, or undo
-- what was written and refuse.
local function mend(r, ...)
  local cmd, key, field, n = ...
  if string.find(r.err, "WRONGTYPE", 1, true) then
    aside(key)
    flag(key)
    r = redis.pcall(...)
  elseif string.find(r.err, "not an integer", 1, true) and (cmd == "HINCRBY" or cmd == "INCR") then
    if cmd == "HINCRBY" then
      redis.pcall("HSET", key, field, n)
      r = tonumber(n)
    else
      redis.pcall("SET", key, 1)
      r = 1
    end
    flag(key)
  end
  if type(r) == "table" and r.err then
    undo_all()
    return nil, refuse("writing " .. shown(key) .. " failed: " .. tostring(r.err))
  end
  return r
end
local function read(...)
  local r = redis.pcall(...)
  local key = select(2, ...)
  if type(r) == "table" and r.err and string.find(r.err, "WRONGTYPE", 1, true) then
    aside(key)
    return false
  end
  if type(r) == "table" and r.err then
    return nil, refuse("reading " .. shown(key) .. " failed: " .. tostring(r.err))
  end
  return r
end

local idem = nil
if idem_key ~= "" then
  -- Idempotency keys are the organisation's own: another organisation's key never answers.
  idem = base .. ":idem:" .. org .. ":" .. idem_key
  local first, err = read("GET", idem)
  if err then return err end
  if first then return { first, "duplicate" } end
  -- A key written before keys were scoped (at most one TTL after the upgrade) still answers,
  -- but only for its own organisation's job.
  first, err = read("GET", base .. ":idem:" .. idem_key)
  if err then return err end
  if first then
    local owner = redis.pcall("HGET", base .. ":job:" .. first, "org")
    if type(owner) ~= "string" or owner == org then return { first, "duplicate" } end
  end
end

-- Events (README.md, "Outcomes"): on unless the daemon's {p}:config says off, the stream
-- bounded as it says (every value checked; anything else means the default).
local cfg, cfg_err = read("HMGET", base .. ":config", "events", "events_max_len", "events_max_age_ms")
if cfg_err then return cfg_err end
cfg = cfg or {}
local events_on = cfg[1] ~= "off"
local events_max_len = int_in(cfg[2], 1, 100000000000) or 1000000
local events_max_age = int_in(cfg[3], 1000, 1000000000000) or 86400000

local own = job_id ~= ""
local r, err
if not own then
  -- Unique across a Redis that lost its data: the counter restarts, the clock does not.
  r = redis.pcall("INCR", seq_key)
  if type(r) == "table" then r, err = mend(r, "INCR", seq_key) end
  if err then return err end
  did_seq = true
  job_id = "j-" .. t[1] .. string.sub("00000" .. t[2], -6) .. "-" .. r
elseif redis.call("EXISTS", base .. ":job:" .. job_id, base .. ":done:" .. job_id) > 0 then
  -- Queued, dead, or finished within the idempotency TTL: never run or paid for twice.
  return { job_id, "duplicate" }
end

r = redis.pcall("HINCRBY", counters, "enqueued", 1)
if type(r) == "table" then r, err = mend(r, "HINCRBY", counters, "enqueued", 1) end
if err then return err end
did_count = true
local state
if delay_ms > 0 then
  state = "delayed"
  r = redis.pcall("ZADD", delayed, now + delay_ms, job_id)
  if type(r) == "table" then r, err = mend(r, "ZADD", delayed, now + delay_ms, job_id) end
  if err then return err end
  did_delayed = true
else
  -- Waiting: append to the organisation's list; a list that was empty puts the organisation
  -- into its tier's round-robin ring and its head time into the tier's heads set.
  state = "waiting"
  r = redis.pcall("RPUSH", list, job_id)
  if type(r) == "table" then r, err = mend(r, "RPUSH", list, job_id) end
  if err then return err end
  did_list = true
  if r == 1 then
    r = redis.pcall("RPUSH", ring, org)
    if type(r) == "table" then r, err = mend(r, "RPUSH", ring, org) end
    if err then return err end
    did_ring = true
    r = redis.pcall("ZADD", heads, now, org)
    if type(r) == "table" then r, err = mend(r, "ZADD", heads, now, org) end
    if err then return err end
    did_heads = true
  end
  r = redis.pcall("HINCRBY", depth, tier, 1)
  if type(r) == "table" then r, err = mend(r, "HINCRBY", depth, tier, 1) end
  if err then return err end
end
if events_on then
  local stream = base .. ":events"
  local ev = { "XADD", stream, "MAXLEN", "~", events_max_len, "*", "type", "created",
    "job_id", job_id, "org", org, "tier", tier, "kind", kind, "state", state, "at", now,
    "attempts", 0 }
  if delay_ms > 0 then ev[#ev + 1] = "until"; ev[#ev + 1] = now + delay_ms end
  r = redis.pcall(unpack(ev))
  if type(r) == "table" and r.err then r, err = mend(r, unpack(ev)) end
  if err then return err end
  redis.pcall("XTRIM", stream, "MINID", "~", now - events_max_age)
  redis.pcall("HINCRBY", counters, "events", 1)
end
-- The job's own hash is new (EXISTS said so) and the idempotency key is a plain SET: neither
-- can be refused, so they come last.
redis.call("HSET", base .. ":job:" .. job_id, "kind", kind, "tier", tier, "org", org,
  "payload", payload, "attempts", 0, "interrupts", 0, "max_attempts", max_attempts, "token", 0,
  "enqueued_at", now, "idem", idem_key, "state", state, "ready_at", now)
if delay_ms > 0 then
  redis.call("HSET", base .. ":job:" .. job_id, "due_at", now + delay_ms, "delay_reason", "scheduled")
  -- The delayed jobs per tier and reason (the daemon's scripts keep the rest of {p}:held).
  if type(redis.pcall("HINCRBY", base .. ":held", "delayed:" .. tier .. ":scheduled", 1)) == "table" then
    redis.pcall("HSET", base .. ":repair", "held", now)
  end
end
if idem then redis.call("SET", idem, job_id, "EX", idem_ttl) end
return { job_id, "created" }
