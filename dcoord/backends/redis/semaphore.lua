-- A permit-expirable counting semaphore (after Redisson's): one step per call.
-- KEYS[1] sorted set: permit id -> expiry in ms by the server's clock
-- KEYS[2] the semaphore's last fence (never expires)
-- ARGV[1] operation: acquire | release | extend; ARGV[2] the permit id (one per grant);
-- ARGV[3] TTL in ms; ARGV[4] the limit; ARGV[5] the channel releases are published on.
-- acquire: the fence (> 0) if granted, else -(ms until the first permit expires).
-- release: 1 if the permit was held, 0 if not (expired, or never granted).
-- extend: 1 if extended, 0 if the permit is not held (expired or never granted).
local permits, fence_key = KEYS[1], KEYS[2]
local op, id, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])

-- Reclaim the permits of holders that stopped renewing: every permit left is live.
prune(permits)

if op == 'acquire' then
  local limit = tonumber(ARGV[4])
  -- Full when a permit sits at index limit - 1 (O(log n), not a count of the set).
  if #redis.call('ZRANGE', permits, limit - 1, limit - 1) == 0 then
    redis.call('ZADD', permits, now + ttl, id)
    expire_at_least(permits, ttl)
    return next_fence(fence_key)
  end
  local first = redis.call('ZRANGE', permits, 0, 0, 'WITHSCORES')
  return -math.max(1, tonumber(first[2]) - now)
elseif op == 'release' then
  if redis.call('ZREM', permits, id) == 0 then return 0 end
  redis.call('PUBLISH', ARGV[5], 'released')
  return 1
elseif op == 'extend' then
  if not present(permits, id) then return 0 end
  redis.call('ZADD', permits, 'XX', now + ttl, id)
  expire_at_least(permits, ttl)
  return 1
end
return redis.error_reply('unknown semaphore operation ' .. tostring(op))
