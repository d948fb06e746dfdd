-- Create a transaction record, indexed as unfinished and as started, unless it exists.
-- KEYS[1] record, KEYS[2] unfinished index (zset by deadline), KEYS[3] started index
-- (zset by creation time)
-- ARGV[1] record bytes, ARGV[2] deadline, ARGV[3] txid, ARGV[4] creation time
check('SET', KEYS[1], ARGV[1], 'NX')
check('ZADD', KEYS[2], '0', ARGV[3])  -- else a record no recovery would find
check('ZADD', KEYS[3], '0', ARGV[3])
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
    redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
    redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
    return 1
end
return 0
