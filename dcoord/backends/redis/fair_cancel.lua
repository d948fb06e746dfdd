-- Fair lock: leave the queue (a waiting acquire gave up) and let go of the lock if the
-- token holds it (handed over meanwhile, or an acquire whose reply was lost), passing
-- it to the next live waiter if that frees the lock or its turn. After fair_purge.lua;
-- keys as there. ARGV[1] the token, ARGV[2] the lock's release channel, ARGV[3] the
-- fence skew margin in microseconds.
-- Returns 1 if the token held the lock (now released), else 0.
local held = redis.call('GET', KEYS[1])
local mine = held == ARGV[1]
local was_head = head == ARGV[1]
if was_head then
  -- Out of the queue first: the next live waiter behind it heads it now. (Should the
  -- channel be denied below, the script fails having only dropped entries.)
  redis.call('LPOP', KEYS[3])
  redis.call('ZREM', KEYS[4], ARGV[1])
  head = live_head()
end
local handed = false
if mine or (was_head and not held) then
  if head then
    handed = hand_over(head, ARGV[2], tonumber(ARGV[3]))
  elseif mine then
    redis.call('PUBLISH', ARGV[2], 'released')
  end
end
redis.call('LREM', KEYS[3], 1, ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if mine then
  if not handed then
    redis.call('DEL', KEYS[1])
  end
  return 1
end
return 0
