-- Replace a transaction record only if it still holds exactly the expected bytes, and
-- move its entry to the index of its new state. A finished record leaves the unfinished
-- index and expires after the retention; its index entry is forgotten by a later
-- finishing write of the bucket (the "done" zset says when).
-- KEYS[1] record, KEYS[2] unfinished index, KEYS[3] index of the new state,
-- KEYS[4] done (zset of finished txids by expiry, server ms), KEYS[5] and KEYS[6] the
-- committed and aborted indexes, KEYS[7..] the indexes the entry may be in now (that of
-- the state it was read in, or every state's when the caller does not know)
-- ARGV[1] expected bytes, ARGV[2] new bytes, ARGV[3] "1" if finished,
-- ARGV[4] retention in ms, ARGV[5] txid, ARGV[6] creation time
check('SET', KEYS[1], ARGV[2], 'PX', '1')
check('ZREM', KEYS[2], ARGV[5])  -- else a finished record still indexed as unfinished
check('ZADD', KEYS[3], '0', ARGV[5])
check('ZADD', KEYS[4], '0', ARGV[5])
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
for i = 7, #KEYS do
    redis.call('ZREM', KEYS[i], ARGV[5])
end
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[5])
if ARGV[3] == '1' then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[4])
    redis.call('ZREM', KEYS[2], ARGV[5])
    -- The record expires at now + retention by this server's clock; so does its entry
    -- here. Up to 16 entries already past it leave their indexes on each finish: more
    -- than the one added, so the indexes never outgrow the retained records for long.
    local time = redis.call('TIME')
    local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
    redis.call('ZADD', KEYS[4], now + tonumber(ARGV[4]), ARGV[5])
    local gone = redis.call('ZRANGE', KEYS[4], '-inf', now, 'BYSCORE', 'LIMIT', 0, 16)
    if #gone > 0 then
        for i = 5, 6 do
            redis.call('ZREM', KEYS[i], unpack(gone))
        end
        redis.call('ZREM', KEYS[4], unpack(gone))
    end
else
    redis.call('SET', KEYS[1], ARGV[2])
end
return 1
