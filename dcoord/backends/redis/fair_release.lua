-- Fair lock release (after fair_purge.lua; keys as there): release.lua, but the message
-- calls the queue's head ("next:<token>") instead of waking every waiter.
-- ARGV[1] the owner's token, ARGV[2] the lock's release channel.
-- Returns 1 if released, 0 if the lock was not the caller's (expired or taken over).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  -- PUBLISH first: a denied channel fails the release before the DEL.
  redis.call('PUBLISH', ARGV[2], head and ('next:' .. head) or 'released')
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
