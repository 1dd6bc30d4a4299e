-- Admit one job of an organisation under its jobs-per-minute limit, counted across every
-- process in fixed one-minute windows. KEYS[1] base. ARGV: org, limit.
-- Returns 0 when admitted, else the milliseconds until the next window.
local base = KEYS[1]
local org, limit = ARGV[1], tonumber(ARGV[2])
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local minute = math.floor(now / 60000)
local key = base .. ":rate:" .. org .. ":" .. minute
local n = tonumber(redis.call("GET", key) or "0")
if n >= limit then return (minute + 1) * 60000 - now end
redis.call("INCR", key)
redis.call("PEXPIRE", key, 120000)
return 0
