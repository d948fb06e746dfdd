-- Fair lock: leave the queue (a waiting acquire gave up) and let go of the lock if the
-- token holds it (undo of an acquire whose reply was lost), waking the waiters if the
-- lock is free with a new head. KEYS[1] the lock key, KEYS[2] the queue, KEYS[3] the
-- waiters' expiries; ARGV[1] the token, ARGV[2] the release channel.
-- Returns 1 if the token held the lock (now released), else 0.
local held = redis.call('GET', KEYS[1])
local head = redis.call('LINDEX', KEYS[2], 0)
-- PUBLISH before any write: a denied channel fails the script with nothing changed.
if held == ARGV[1] or (head == ARGV[1] and not held) then
  redis.call('PUBLISH', ARGV[2], 'released')
end
redis.call('LREM', KEYS[2], 1, ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if held == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
