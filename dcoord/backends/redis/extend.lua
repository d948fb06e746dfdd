-- Reset a held lock's TTL if the caller's token still holds it.
-- KEYS[1] the lock key; ARGV[1] the owner's token, ARGV[2] the new TTL in milliseconds.
-- Returns 1 if extended, 0 if the lock was not the caller's.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
