-- A permit-expirable counting semaphore (after Redisson's): one step per call.
-- KEYS[1] sorted set: permit id -> expiry in ms by the server's clock
-- KEYS[2] the semaphore's last fence (never expires)
-- ARGV[1] operation: acquire | release | extend; ARGV[2] the permit id (one per grant);
-- ARGV[3] TTL in ms; ARGV[4] the limit; ARGV[5] the channel releases are published on.
-- acquire: the fence (> 0) if granted, else -(ms until the first permit expires).
-- release: 1 if the permit was held, 0 if not (expired: removed anyway, and waiters woken).
-- extend: 1 if extended, 0 if the permit is not held (expired or never granted).
local permits, fence_key = KEYS[1], KEYS[2]
local op, id, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])

if op == 'acquire' then
  -- Reclaim the permits of holders that stopped renewing.
  redis.call('ZREMRANGEBYSCORE', permits, '-inf', now)
  if redis.call('ZCARD', permits) < tonumber(ARGV[4]) then
    redis.call('ZADD', permits, now + ttl, id)
    expire_at_least(permits, ttl)
    return next_fence(fence_key)
  end
  local first = redis.call('ZRANGE', permits, 0, 0, 'WITHSCORES')
  return -math.max(1, tonumber(first[2]) - now)
end

local expiry = redis.call('ZSCORE', permits, id)
if op == 'release' then
  if not expiry then return 0 end
  redis.call('ZREM', permits, id)
  redis.call('PUBLISH', ARGV[5], 'released')
  if tonumber(expiry) > now then return 1 end
  return 0
elseif op == 'extend' then
  if not expiry or tonumber(expiry) <= now then return 0 end
  redis.call('ZADD', permits, 'XX', now + ttl, id)
  expire_at_least(permits, ttl)
  return 1
end
return redis.error_reply('unknown semaphore operation ' .. tostring(op))
