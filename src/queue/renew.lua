-- Extend the leases of jobs still running. ARGV: lease_ms, then pairs of id, token.
-- Returns one integer per pair: 1 extended, 0 lost (stale token or no lease any more).
local base = KEYS[1]
local lease_ms = tonumber(ARGV[1])
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local inflight = base .. ":inflight"
local out = {}
for i = 2, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  if redis.call("HGET", base .. ":job:" .. id, "token") == token and redis.call("ZSCORE", inflight, id) then
    redis.call("ZADD", inflight, "XX", now + lease_ms, id)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
