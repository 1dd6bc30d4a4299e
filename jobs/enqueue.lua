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
-- ARGV[3]  organization_id: the UUID the job is billed to (also inside the payload)
-- ARGV[4]  payload: the job's JSON document (see jobs/schema/<kind>.json)
-- ARGV[5]  job_id: optional ("" = the queue assigns one); an id already queued is a duplicate
-- ARGV[6]  delay_ms: run no earlier than this many milliseconds from now ("0" = now)
-- ARGV[7]  idempotency_key: optional ("" = none)
-- ARGV[8]  idempotency_ttl_s: how long the key is remembered (seconds, > 0 when a key is given)
-- ARGV[9]  max_attempts: executions before the dead set ("0" = the daemon's default)
--
-- Returns { job_id, "created" } or { first_job_id, "duplicate" }.
-- Errors are replies starting with "ERR aiq:"; nothing is written when one is returned.

local base = KEYS[1]
local kind, tier, org, payload = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local job_id, delay_ms = ARGV[5], tonumber(ARGV[6])
local idem_key, idem_ttl, max_attempts = ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])

local TIERS = { enterprise_plus = true, enterprise = true, professional_agency = true,
                growth_team = true, solo_professional = true, trial = true }
local KINDS = { ["vision.annotate"] = true, ["llm.complete"] = true }

if not KINDS[kind] then return redis.error_reply("ERR aiq: unknown kind " .. tostring(kind)) end
if not TIERS[tier] then return redis.error_reply("ERR aiq: unknown tier " .. tostring(tier)) end
if type(org) ~= "string" or not string.match(org, "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$") then
  return redis.error_reply("ERR aiq: organization_id must be a UUID")
end
if type(payload) ~= "string" or #payload == 0 then return redis.error_reply("ERR aiq: empty payload") end
if #payload > 10485760 then return redis.error_reply("ERR aiq: payload larger than 10 MiB") end
if delay_ms == nil or delay_ms < 0 then return redis.error_reply("ERR aiq: delay_ms must be >= 0") end
if max_attempts == nil or max_attempts < 0 or max_attempts > 100 then
  return redis.error_reply("ERR aiq: max_attempts must be 0..100")
end
if job_id ~= "" and (#job_id > 128 or string.find(job_id, "[%s{}]")) then
  return redis.error_reply("ERR aiq: job_id must be 1-128 characters without spaces or braces")
end
if idem_key ~= "" and (idem_ttl == nil or idem_ttl <= 0) then
  return redis.error_reply("ERR aiq: idempotency_ttl_s must be > 0 with an idempotency key")
end

if idem_key ~= "" then
  local first = redis.call("GET", base .. ":idem:" .. idem_key)
  if first then return { first, "duplicate" } end
end
if job_id == "" then
  job_id = "j" .. redis.call("INCR", base .. ":seq")
elseif redis.call("EXISTS", base .. ":job:" .. job_id) == 1 then
  return { job_id, "duplicate" }
end
if idem_key ~= "" then
  redis.call("SET", base .. ":idem:" .. idem_key, job_id, "EX", math.floor(idem_ttl))
end

local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local job = base .. ":job:" .. job_id
redis.call("HSET", job, "kind", kind, "tier", tier, "org", org, "payload", payload,
  "attempts", 0, "interrupts", 0, "max_attempts", max_attempts, "token", 0,
  "enqueued_at", now, "idem", idem_key)
redis.call("HINCRBY", base .. ":counters", "enqueued", 1)

if delay_ms > 0 then
  redis.call("HSET", job, "state", "delayed")
  redis.call("ZADD", base .. ":delayed", now + delay_ms, job_id)
else
  -- Waiting: append to the organisation's list; a list that was empty puts the organisation
  -- into its tier's round-robin ring and its head time into the tier's heads set.
  redis.call("HSET", job, "state", "waiting", "ready_at", now)
  local list = base .. ":wait:" .. tier .. ":" .. org
  if redis.call("RPUSH", list, job_id) == 1 then
    redis.call("RPUSH", base .. ":orgs:" .. tier, org)
    redis.call("ZADD", base .. ":heads:" .. tier, now, org)
  end
  redis.call("HINCRBY", base .. ":depth", tier, 1)
end
return { job_id, "created" }
