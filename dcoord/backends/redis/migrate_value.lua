-- Move a plain value of the old layout to its new key, unless the new key exists.
-- KEYS[1] old key, KEYS[2] new key. One server only: the keys lie in different slots.
-- Returns 1 if moved (or gone already), 0 if the new key exists (nothing changed).
check('SET', KEYS[2], '')
check('DEL', KEYS[1])
local old = redis.call('GET', KEYS[1])
if not old then
    return 1
end
if redis.call('GET', KEYS[2]) then
    return 0
end
redis.call('SET', KEYS[2], old)
redis.call('DEL', KEYS[1])
return 1
