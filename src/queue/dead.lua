-- Operator actions on the dead set, for the given job ids (the caller pages through the set, so
-- each call is bounded). ARGV: op ("retry" | "purge"), then job ids.
-- retry: the job becomes waiting again at the tail of its tier with its attempts reset.
-- purge: the job is deleted.
-- Returns one integer per id: 1 done, 0 not in the dead set.
local base = KEYS[1]
local op = ARGV[1]
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead, counters = base .. ":dead", base .. ":counters"
local out = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  local job = base .. ":job:" .. id
  if redis.call("ZREM", dead, id) == 0 then
    out[#out + 1] = 0
  elseif op == "purge" or redis.call("EXISTS", job) == 0 then
    redis.call("DEL", job)
    redis.call("HINCRBY", counters, "purged", 1)
    out[#out + 1] = 1
  else
    redis.call("HINCRBY", job, "token", 1)
    redis.call("HSET", job, "attempts", 0, "interrupts", 0, "state", "waiting", "ready_at", now)
    redis.call("HDEL", job, "dead_reason", "dead_at")
    local tier, org = unpack(redis.call("HMGET", job, "tier", "org"))
    local list = base .. ":wait:" .. tier .. ":" .. org
    if redis.call("RPUSH", list, id) == 1 then
      redis.call("RPUSH", base .. ":orgs:" .. tier, org)
      redis.call("ZADD", base .. ":heads:" .. tier, now, org)
    end
    redis.call("HINCRBY", base .. ":depth", tier, 1)
    redis.call("HINCRBY", counters, "revived", 1)
    out[#out + 1] = 1
  end
end
return out
