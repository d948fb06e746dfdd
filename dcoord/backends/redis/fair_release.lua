-- Fair lock release (after fair_purge.lua; keys as there): release.lua, but the lock
-- passes to the queue's live head (hand_over) instead of waking every waiter.
-- ARGV[1] the owner's token, ARGV[2] the lock's release channel, ARGV[3] the fence skew
-- margin in microseconds (for the next waiter's fence).
-- Returns 1 if released, 0 if the lock was not the caller's (expired or taken over).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if head then
    if hand_over(head, ARGV[2], tonumber(ARGV[3])) then
      return 1 -- the lock key holds the next waiter's token now
    end
  else
    -- PUBLISH first: a denied channel fails the release before the DEL.
    redis.call('PUBLISH', ARGV[2], 'released')
  end
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
