-- Acquire a lock: SET NX PX and, on success, hand out the next fence (after
-- lock_fence.lua). KEYS[1] the lock key (holds the owner's token), KEYS[2] the lock's
-- fence counter; both carry the lock's hash tag, so the script is single-slot on Redis
-- Cluster. ARGV[1] the owner's token, ARGV[2] the TTL in milliseconds, ARGV[3] the fence
-- skew margin in microseconds (0: none).
-- Returns the fence (> 0) when granted, else -(the holder's remaining TTL in ms) as a
-- wait hint (0 if the holder has no TTL, which dcoord never writes).
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local fence = lock_fence(tonumber(ARGV[3]))
  redis.call('SET', KEYS[2], string.format('%.0f', fence))
  return fence
end
local pttl = redis.call('PTTL', KEYS[1])
if pttl < 0 then
  return 0
end
return -pttl
