-- Requests and tokens per minute per provider, counted across every process in fixed one-minute
-- windows. KEYS[1] base. ARGV: provider, rpm (0 = no limit), tpm (0 = no limit), tokens.
-- Returns 0 when the call may go (and counts it), else the milliseconds to the next window.
local base = KEYS[1]
local provider, rpm, tpm, tokens = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local minute = math.floor(now / 60000)
local rkey = base .. ":rpm:" .. provider .. ":" .. minute
local tkey = base .. ":tpm:" .. provider .. ":" .. minute
local r = tonumber(redis.call("GET", rkey) or "0")
local used = tonumber(redis.call("GET", tkey) or "0")
if (rpm > 0 and r + 1 > rpm) or (tpm > 0 and used + tokens > tpm) then
  return (minute + 1) * 60000 - now
end
redis.call("INCR", rkey)
redis.call("PEXPIRE", rkey, 120000)
redis.call("INCRBY", tkey, tokens)
redis.call("PEXPIRE", tkey, 120000)
return 0
