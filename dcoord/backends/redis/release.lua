-- Release a lock if the caller's token still holds it, and wake the waiters.
-- KEYS[1] the lock key; ARGV[1] the owner's token, ARGV[2] the lock's release channel.
-- Returns 1 if released, 0 if the lock was not the caller's (expired or taken over).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  -- PUBLISH first: a script is not rolled back, so a denied channel must fail the
  -- release before the DEL, not leave the lock deleted behind an error.
  redis.call('PUBLISH', ARGV[2], 'released')
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
