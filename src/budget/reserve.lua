-- Reserve `amount` micro-USD in every scope at once, or in none. A scope's hash holds `spent`
-- (settled) and `reserved` (held by calls in flight); a reservation fits when
-- spent + reserved + amount <= limit in every scope.
--
-- KEYS[1] base (the budget's hash tag). ARGV: res_id, amount, ttl_ms, meta (JSON), n, then
-- n triples: scope suffix, limit, key ttl (s), then the day window's start and end (ms).
-- Returns {1} reserved, {2} already reserved (a replay: nothing changes),
-- {0, i, spent, reserved} refused by scope i (1-based): nothing is written,
-- {3, now_ms} the windows were computed from a clock that disagrees with Redis's (the caller
-- computes them again from now_ms): nothing is written,
-- {4} the counters cannot be trusted: the ledger marker {b}:ledger is missing, so Redis lost its
-- data (or was never filled) and no reservation is made until they are rebuilt from PostgreSQL.
local base = KEYS[1]
local res_id, amount, ttl_ms, meta, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local res = base .. ":res:" .. res_id
if redis.call("EXISTS", base .. ":ledger") == 0 then return { 4 } end
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local from, to = tonumber(ARGV[6 + 3 * n]), tonumber(ARGV[7 + 3 * n])
if from and to and (now < from or now >= to) then return { 3, now } end
if redis.call("EXISTS", res) == 1 then return { 2 } end
for i = 0, n - 1 do
  local suffix, limit = ARGV[6 + 3 * i], tonumber(ARGV[7 + 3 * i])
  local h = redis.call("HMGET", base .. ":spend:" .. suffix, "spent", "reserved")
  local spent, reserved = tonumber(h[1]) or 0, tonumber(h[2]) or 0
  if spent + reserved + amount > limit then return { 0, i + 1, spent, reserved } end
end
for i = 0, n - 1 do
  local suffix, limit, key_ttl = ARGV[6 + 3 * i], ARGV[7 + 3 * i], tonumber(ARGV[8 + 3 * i])
  local key = base .. ":spend:" .. suffix
  redis.call("HINCRBY", key, "reserved", amount)
  redis.call("HSETNX", key, "spent", 0)
  redis.call("EXPIRE", key, key_ttl)
  redis.call("HSET", res, "s:" .. suffix, limit)
end
redis.call("HSET", res, "_amount", amount, "_meta", meta, "_at", now)
redis.call("ZADD", base .. ":res_expiry", now + ttl_ms, res_id)
return { 1 }
