-- Move one transaction record of the old layout (one index for all) into its bucket.
-- KEYS[1] old record, KEYS[2] old index, KEYS[3] new record, KEYS[4] its bucket's index
-- ARGV[1] txid, ARGV[2] its deadline (the old index's score)
-- A record already in the new layout wins (moved before, then changed there): the old
-- copy is only dropped. An index entry without a record moves too, so that recovery
-- still reports it as indexed but missing.
check('SET', KEYS[3], '')
check('ZADD', KEYS[4], '0', ARGV[1])
check('DEL', KEYS[1])
check('ZREM', KEYS[2], ARGV[1])
if not redis.call('GET', KEYS[3]) then
    local data = redis.call('GET', KEYS[1])
    if data then
        redis.call('SET', KEYS[3], data)
    end
    redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
