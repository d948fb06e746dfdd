-- Move a fence of the old layout to its new key, keeping the greater token of the two
-- (compared as fence_admit.lua does: decimal strings, by length, then by bytes).
-- KEYS[1] old key, KEYS[2] new key. One server only: the keys lie in different slots.
check('SET', KEYS[2], '')
check('DEL', KEYS[1])
local old = redis.call('GET', KEYS[1])
if old then
    local new = redis.call('GET', KEYS[2])
    if not new or #old > #new or (#old == #new and old > new) then
        redis.call('SET', KEYS[2], old)
    end
    redis.call('DEL', KEYS[1])
end
return 1
