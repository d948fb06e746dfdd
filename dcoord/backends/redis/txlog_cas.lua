-- Replace a transaction record only if it still holds exactly the expected bytes.
-- A finished record leaves the unfinished index and expires after the retention.
-- KEYS[1] record, KEYS[2] unfinished index
-- ARGV[1] expected bytes, ARGV[2] new bytes, ARGV[3] "1" if finished,
-- ARGV[4] retention in ms, ARGV[5] txid
check('SET', KEYS[1], ARGV[2], 'PX', '1')
check('ZREM', KEYS[2], ARGV[5])  -- else a finished record still indexed as unfinished
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
if ARGV[3] == '1' then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[4])
    redis.call('ZREM', KEYS[2], ARGV[5])
else
    redis.call('SET', KEYS[1], ARGV[2])
end
return 1
