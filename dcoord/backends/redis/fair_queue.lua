-- Fair lock acquire, the queue half: fair_purge.lua runs before it and acquire.lua after
-- it (one script), which it falls through to when the caller may take the lock: the lock
-- is free and the caller heads the queue (or the queue is empty). Otherwise the caller
-- queues (or refreshes its entry) and waits to be granted or called (hand_over).
-- Keys as fair_purge.lua. ARGV[1..3] as acquire.lua (token, TTL ms, fence skew margin),
-- ARGV[4] the lock's release channel, ARGV[5] how long a waiter's entry lives unless it
-- calls again (ms): a dead waiter leaves the queue after that; 0: do not queue.
-- Returns what acquire.lua returns; a caller not granted gets -(ms to wait at most).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  -- Handed the lock meanwhile (its message may still be on its way): its fence is the
  -- last one counted, as no grant can follow while it holds the lock. (A counter lost
  -- since then gets a new fence, above every earlier one as acquire.lua's.)
  local fence = redis.call('GET', KEYS[2])
  if not fence then
    fence = string.format('%.0f', lock_fence(tonumber(ARGV[3])))
    redis.call('SET', KEYS[2], fence)
  end
  return tonumber(fence)
end
local held = redis.call('PTTL', KEYS[1])
local ours = held == -2 and (not head or head == ARGV[1])
if held == -2 and head and not ours then
  -- Free, and another waiter heads the queue: a new head nobody called (the one before
  -- it died), or the holder's TTL ran out. Hand it over (an older client's waiter is
  -- called only once, when it becomes the head). (Should the channel be denied, the
  -- script fails having only dropped dead entries.)
  if purged or takes_grants(head) then
    if hand_over(head, ARGV[4], tonumber(ARGV[3])) then
      held = redis.call('PTTL', KEYS[1])
    end
  end
end
if ours then
  if head then
    redis.call('LPOP', KEYS[3])
    redis.call('ZREM', KEYS[4], ARGV[1])
  end
elseif ARGV[5] == '0' then
  return -1
else
  local expires = now + tonumber(ARGV[5])
  if redis.call('ZADD', KEYS[4], expires, ARGV[1]) == 1 then
    redis.call('RPUSH', KEYS[3], ARGV[1])
  end
  -- The queue's keys outlive their last entry by no more than its expiry.
  for i = 3, 4 do
    if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[5]) then
      redis.call('PEXPIRE', KEYS[i], ARGV[5])
    end
  end
  if held == -1 then
    return 0 -- a holder without TTL (not written by dcoord): no hint
  end
  if held == -2 then
    -- Free, but an older client's waiter heads the queue: it was called; if it is dead,
    -- it is dropped when its entry expires.
    held = tonumber(redis.call('ZSCORE', KEYS[4], head)) - now
  end
  return -math.max(1, held)
end
