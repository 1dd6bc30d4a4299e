-- Settle a reservation: in each of its scopes, `reserved` drops by the reserved amount and
-- `spent` grows by the actual cost. Idempotent: a reservation already settled (or swept) is gone,
-- and settling it again changes nothing.
-- KEYS[1] base. ARGV: res_id, actual.
-- Returns one {suffix, spent, reserved, limit} per scope, or {} when there was nothing to settle.
local base = KEYS[1]
local res_id, actual = ARGV[1], tonumber(ARGV[2])
local res = base .. ":res:" .. res_id
local fields = redis.call("HGETALL", res)
if #fields == 0 then return {} end
local amount = 0
for i = 1, #fields, 2 do
  if fields[i] == "_amount" then amount = tonumber(fields[i + 1]) end
end
local out = {}
for i = 1, #fields, 2 do
  local f = fields[i]
  if string.sub(f, 1, 2) == "s:" then
    local suffix = string.sub(f, 3)
    local key = base .. ":spend:" .. suffix
    local reserved = redis.call("HINCRBY", key, "reserved", -amount)
    if reserved < 0 then
      -- Only after a rebuild that dropped reservations: never let the hold go negative.
      redis.call("HSET", key, "reserved", 0)
      reserved = 0
    end
    local spent = redis.call("HINCRBY", key, "spent", actual)
    out[#out + 1] = { suffix, spent, reserved, tonumber(fields[i + 1]) }
  end
end
redis.call("DEL", res)
redis.call("ZREM", base .. ":res_expiry", res_id)
return out
