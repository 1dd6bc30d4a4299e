-- The repair scan: after guard.lua moved a corrupt list or set aside (or reset a counter), the
-- jobs that were in it are in no list and no set. This puts them back, a bounded SCAN page of job
-- hashes per call, from what each job's own hash says (its state, tier and organisation), then
-- recounts the waiting depth from the lists. guard.lua is prepended.
--
-- ARGV: "scan", cursor, count   -> returns the next cursor ("0" when the scan is complete)
--       "finish", started_ms    -> recounts the depth, clears the flags raised before started_ms,
--                                  returns how many flags are left (raised during the scan)

local base = KEYS[1]
local now = G_now
local TIERS = { "enterprise_plus", "enterprise", "professional_agency", "growth_team",
                "solo_professional", "trial" }
local TIER = {}
for i = 1, 6 do TIER[TIERS[i]] = true end
local flags = {}
local raw = redis.call("HGETALL", base .. ":repair")
for i = 1, #raw, 2 do flags[raw[i]] = tonumber(raw[i + 1]) or 0 end

if ARGV[1] == "finish" then
  local started = tonumber(ARGV[2])
  for i = 1, 6 do
    local tier = TIERS[i]
    local ring = base .. ":orgs:" .. tier
    local orgs = get("LRANGE", ring, 0, -1) or {}
    -- The ring holds each organisation once: rebuild it if a repair or a corrupt key doubled one.
    local seen, unique, n = {}, {}, 0
    for _, org in ipairs(orgs) do
      if not seen[org] then
        seen[org] = true
        local len = get("LLEN", base .. ":wait:" .. tier .. ":" .. org) or 0
        if len > 0 then
          unique[#unique + 1] = org
          n = n + len
        end
      end
    end
    if #unique ~= #orgs then
      redis.call("DEL", ring)
      if #unique > 0 then redis.call("RPUSH", ring, unpack(unique)) end
    end
    put("HSET", base .. ":depth", tier, n)
  end
  local left = 0
  for name, at in pairs(flags) do
    if at <= started then redis.call("HDEL", base .. ":repair", name) else left = left + 1 end
  end
  return left
end

local cursor, count = ARGV[2], tonumber(ARGV[3])
local r = redis.call("SCAN", cursor, "MATCH", base .. ":job:*", "COUNT", count)
local prefix = #base + 6 -- "<base>:job:"
for _, key in ipairs(r[2]) do
  local t = redis.call("TYPE", key)
  t = type(t) == "table" and t.ok or t
  if t == "hash" then
    local id = string.sub(key, prefix)
    local state, tier, org, ready, dead_at =
      unpack(redis.call("HMGET", key, "state", "tier", "org", "ready_at", "dead_at"))
    if state == "waiting" then
      if not TIER[tier] or not org then
        bury(id, "a waiting job without a known tier or organisation")
      else
        local list = base .. ":wait:" .. tier .. ":" .. org
        local ring = base .. ":orgs:" .. tier
        if flags["wait:" .. tier .. ":" .. org] and not get("LPOS", list, id) then
          put("RPUSH", list, id)
        end
        if (flags["wait:" .. tier .. ":" .. org] or flags["orgs:" .. tier]) and not get("LPOS", ring, org) then
          put("RPUSH", ring, org)
        end
        if flags["wait:" .. tier .. ":" .. org] or flags["orgs:" .. tier] or flags["heads:" .. tier] then
          put("ZADD", base .. ":heads:" .. tier, "NX", tonumber(ready) or now, org)
        end
      end
    elseif state == "delayed" then
      if flags["delayed"] then put("ZADD", base .. ":delayed", "NX", now, id) end
    elseif state == "inflight" then
      -- Back into the lease set with a lease already over: the reaper returns it.
      if flags["inflight"] then put("ZADD", base .. ":inflight", "NX", now, id) end
    elseif state == "dead" then
      if flags["dead"] then put("ZADD", base .. ":dead", "NX", tonumber(dead_at) or now, id) end
    elseif state == "cancelled" then
      -- Cancelled by cancel.lua, waiting for the daemon to write its row.
      if flags["cancelled"] then put("ZADD", base .. ":cancelled", "NX", now, id) end
    else
      bury(id, "its state is " .. tostring(state))
    end
  end
end
g_finish()
return r[1]
