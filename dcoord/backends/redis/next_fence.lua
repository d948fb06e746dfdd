-- Shared prefix of semaphore.lua and rwlock.lua (concatenated in Python, so the script
-- stays one EVALSHA): the server clock, the next fence, expiry of sorted-set members.
-- Only commands of the namespace ACL rule of docs/security.md (no ZREMRANGEBYSCORE,
-- ZCARD, ZSCORE or EXISTS): a confined user runs these scripts too.
local now_time = redis.call('TIME')
-- the server's clock in milliseconds: expiries are decided by it alone
local now = tonumber(now_time[1]) * 1000 + math.floor(tonumber(now_time[2]) / 1000)

-- fence = max(last fence + 1, server time in microseconds), as the lock's acquire.lua:
-- strictly increasing, also after a restart that lost the counter.
local function next_fence(fence_key)
  local fence = tonumber(now_time[1]) * 1000000 + tonumber(now_time[2])
  local last = tonumber(redis.call('GET', fence_key) or '0')
  if last >= fence then
    fence = last + 1
  end
  redis.call('SET', fence_key, string.format('%.0f', fence))
  return fence
end

-- Keep a set of expiring members no longer than its last member: an abandoned
-- semaphore leaves nothing behind.
local function expire_at_least(key, ms)
  if redis.call('PTTL', key) < ms then
    redis.call('PEXPIRE', key, ms)
  end
end

-- Remove the members of a sorted set whose expiry (score) has passed; afterwards a
-- member that is still there has not expired. unpack() of long lists overflows Lua's
-- C stack: remove in chunks.
local function prune(key)
  local expired = redis.call('ZRANGEBYSCORE', key, '-inf', now)
  for i = 1, #expired, 1000 do
    redis.call('ZREM', key, unpack(expired, i, math.min(i + 999, #expired)))
  end
end

-- Whether ``member`` is in the sorted set (ZADD XX INCR 0 answers nil for a missing
-- member and changes nothing: ZSCORE without needing it in the ACL rule).
local function present(key, member)
  return redis.call('ZADD', key, 'XX', 'INCR', 0, member) ~= false
end
