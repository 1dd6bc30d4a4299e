-- Extend the leases of jobs still running. ARGV: lease_ms, then pairs of id, token.
-- Returns one integer per pair: 1 extended, 0 lost (stale token or no lease any more).
-- guard.lua is prepended: a corrupt key reads as "lost", it never fails the whole call.
local base = KEYS[1]
local lease_ms = tonumber(ARGV[1])
local now = G_now
local inflight = base .. ":inflight"
local out = {}
for i = 2, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  if job_op("HGET", base .. ":job:" .. id, "token") == token and get("ZSCORE", inflight, id) then
    put("ZADD", inflight, "XX", now + lease_ms, id)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
