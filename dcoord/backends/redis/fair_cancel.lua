-- Fair lock: leave the queue (a waiting acquire gave up) and let go of the lock if the
-- token holds it (undo of an acquire whose reply was lost), calling the next waiter if
-- that frees the lock or its turn. After fair_purge.lua; keys as there.
-- ARGV[1] the token, ARGV[2] the lock's release channel.
-- Returns 1 if the token held the lock (now released), else 0.
local held = redis.call('GET', KEYS[1])
local mine = held == ARGV[1]
if mine or (head == ARGV[1] and not held) then
  local next = head
  if head == ARGV[1] then
    next = redis.call('LINDEX', KEYS[3], 1)
  end
  -- PUBLISH before any write: a denied channel fails the script with nothing changed
  -- (but dead entries dropped).
  if next then
    redis.call('PUBLISH', ARGV[2], 'next:' .. next)
  elseif mine then
    redis.call('PUBLISH', ARGV[2], 'released')
  end
end
redis.call('LREM', KEYS[3], 1, ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if mine then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
