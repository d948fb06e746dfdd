-- Create a transaction record and index it as unfinished, unless it exists.
-- KEYS[1] record, KEYS[2] unfinished index (zset by deadline)
-- ARGV[1] record bytes, ARGV[2] deadline, ARGV[3] txid
check('SET', KEYS[1], ARGV[1], 'NX')
check('ZADD', KEYS[2], '0', ARGV[3])  -- else a record no recovery would find
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
    redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
    return 1
end
return 0
