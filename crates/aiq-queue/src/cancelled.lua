-- After the daemon wrote their result rows (status cancelled): forgets jobs that cancel.lua took
-- out of the queue. ARGV: done_ttl_s, then job ids. A job still cancelled loses its hash (an
-- app's own id leaves `{p}:done:<id>` for done_ttl_s, as a finished job does, so enqueueing it
-- again is a duplicate); every id leaves `{p}:cancelled`. Returns how many hashes were removed.
-- guard.lua is prepended.
local base = KEYS[1]
local done_ttl = tonumber(ARGV[1])
local removed = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  local job = base .. ":job:" .. id
  local state = job_op("HGET", job, "state")
  if state == "cancelled" then
    redis.call("DEL", job)
    if string.byte(id, 1) ~= 106 or string.byte(id, 2) ~= 45 then
      redis.call("SET", base .. ":done:" .. id, 1, "EX", done_ttl)
    end
    removed = removed + 1
  end
  put("ZREM", base .. ":cancelled", id)
end
return removed
