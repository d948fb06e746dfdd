-- Acquire a lock: SET NX PX and, on success, hand out the next fence.
-- KEYS[1] the lock key (holds the owner's token), KEYS[2] the lock's fence counter;
-- both carry the lock's hash tag, so the script is single-slot on Redis Cluster.
-- ARGV[1] the owner's token, ARGV[2] the TTL in milliseconds, ARGV[3] the fence skew
-- margin in microseconds (0: none).
-- Returns the fence (> 0) when granted, else -(the holder's remaining TTL in ms) as a
-- wait hint (0 if the holder has no TTL, which dcoord never writes).
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  -- fence = max(last fence + 1, server time in microseconds): strictly increasing, and
  -- a counter that is missing (new lock, or a restarted server that kept nothing on
  -- disk) or stale (lost its last writes) still starts above every fence handed out
  -- before, since no server grants more than one lock per microsecond, as long as this
  -- server's clock is not behind the one that handed them out (docs/locks.md).
  local now = redis.call('TIME')
  local fence = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local counter = redis.call('GET', KEYS[2])
  if not counter then
    -- Nothing to go by but the clock: a margin covers a clock that lags the old one's.
    -- (Added to every grant it would cancel out: old fences would carry it too.)
    fence = fence + tonumber(ARGV[3])
  end
  local last = tonumber(counter or '0')
  if last >= fence then
    fence = last + 1
  end
  redis.call('SET', KEYS[2], string.format('%.0f', fence))
  return fence
end
local pttl = redis.call('PTTL', KEYS[1])
if pttl < 0 then
  return 0
end
return -pttl
