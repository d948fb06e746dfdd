-- A read-write lock whose waiting writers block new readers: one step per call.
-- KEYS[1] sorted set: reader id -> expiry (ms, server clock)
-- KEYS[2] the writer's id, with its TTL (PX)
-- KEYS[3] sorted set: waiting writer id -> expiry of its registration (re-armed by
--         each retry of the waiter; a dead waiter stops blocking readers after its TTL)
-- KEYS[4] the lock's last fence (never expires)
-- ARGV[1] operation: read | write | unwait | release-read | release-write |
--         extend-read | extend-write; ARGV[2] the holder's id (one per grant);
-- ARGV[3] TTL in ms; ARGV[4] the channel releases are published on.
-- read/write: the fence (> 0) if granted, else -(ms until a holder's expiry) as a hint.
local readers, writer, waiting, fence_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local op, id, ttl, channel = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]

prune(readers)
prune(waiting)

-- ms until the first holder's expiry, as a wake-up hint (at least 1)
local function hint()
  local pttl = redis.call('PTTL', writer)
  if pttl > 0 then return -pttl end
  local first = redis.call('ZRANGE', readers, 0, 0, 'WITHSCORES')
  if first[2] then return -math.max(1, tonumber(first[2]) - now) end
  return -ttl
end

local function empty(key)
  return #redis.call('ZRANGE', key, 0, 0) == 0
end

if op == 'read' then
  if redis.call('GET', writer) or not empty(waiting) then
    return hint()
  end
  redis.call('ZADD', readers, now + ttl, id)
  expire_at_least(readers, ttl)
  return next_fence(fence_key)
elseif op == 'write' then
  if redis.call('GET', writer) or not empty(readers) then
    redis.call('ZADD', waiting, now + ttl, id)
    expire_at_least(waiting, ttl)
    return hint()
  end
  redis.call('ZREM', waiting, id)
  redis.call('SET', writer, id, 'PX', ttl)
  return next_fence(fence_key)
elseif op == 'unwait' then
  -- A writer that gave up waiting: the readers it blocked may go.
  if redis.call('ZREM', waiting, id) == 1 then
    redis.call('PUBLISH', channel, 'unwait')
  end
  return 1
elseif op == 'release-read' then
  if redis.call('ZREM', readers, id) == 0 then return 0 end
  redis.call('PUBLISH', channel, 'released')
  return 1
elseif op == 'release-write' then
  if redis.call('GET', writer) ~= id then return 0 end
  redis.call('DEL', writer)
  redis.call('PUBLISH', channel, 'released')
  return 1
elseif op == 'extend-read' then
  if not present(readers, id) then return 0 end
  redis.call('ZADD', readers, 'XX', now + ttl, id)
  expire_at_least(readers, ttl)
  return 1
elseif op == 'extend-write' then
  if redis.call('GET', writer) ~= id then return 0 end
  return redis.call('PEXPIRE', writer, ttl)
end
return redis.error_reply('unknown rwlock operation ' .. tostring(op))
