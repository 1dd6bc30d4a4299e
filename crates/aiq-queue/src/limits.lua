-- The fleet-wide cap on an organisation's leased jobs, around fetch.lua. guard.lua is prepended.
--
-- ARGV: "sync", then pairs of org, cap -> makes {p}:org_limits hold exactly these overrides
--         (the daemon's copy of PostgreSQL's, every few seconds); returns how many fields changed
--       "recount", most -> recounts each organisation's leased jobs from {p}:inflight and puts
--         {p}:org_inflight right where it drifted (a lease that ended while its job's hash could
--         not be read, a count moved aside as corrupt); returns how many organisations' counts
--         changed, or -1 without looking when more than `most` jobs are leased (bounded work)
-- Both read at most one field per override or per leased job, and write only what differs.

local base = KEYS[1]

-- Makes hash `key` hold exactly `want` (field -> value as text): only differences are written.
-- A hash bigger than `most` fields (written by hand) is dropped first rather than read.
local function make(key, want, most)
  if (get("HLEN", key) or 0) > most then redis.call("DEL", key) end
  local changed = 0
  local have = get("HGETALL", key) or {}
  for i = 1, #have, 2 do
    local field, v = have[i], have[i + 1]
    local w = want[field]
    if w == nil then
      put("HDEL", key, field)
      changed = changed + 1
    elseif w ~= v then
      put("HSET", key, field, w)
      changed = changed + 1
    end
    want[field] = nil
  end
  for field, w in pairs(want) do
    put("HSET", key, field, w)
    changed = changed + 1
  end
  return changed
end

if ARGV[1] == "sync" then
  local want, n = {}, 0
  for i = 2, #ARGV - 1, 2 do
    want[ARGV[i]] = ARGV[i + 1]
    n = n + 1
  end
  return make(base .. ":org_limits", want, n + 1000)
end

if ARGV[1] == "recount" then
  local most = tonumber(ARGV[2]) or 0
  local inflight = base .. ":inflight"
  if (get("ZCARD", inflight) or 0) > most then return -1 end
  local want, n = {}, 0
  for _, id in ipairs(get("ZRANGE", inflight, 0, -1) or {}) do
    local org = redis.pcall("HGET", base .. ":job:" .. id, "org")
    if type(org) == "string" then
      if want[org] == nil then n = n + 1 end
      want[org] = (want[org] or 0) + 1
    end
  end
  for org, c in pairs(want) do want[org] = tostring(c) end
  return make(base .. ":org_inflight", want, most + 1000)
end

return redis.error_reply("ERR aiq: limits.lua takes sync or recount")
