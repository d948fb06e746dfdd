-- Atomic multi-key write: if every condition holds, SET the puts and DEL the deletes.
-- KEYS: the nc condition keys, then the np put keys, then the delete keys.
-- ARGV[1] nc, ARGV[2] np, then per condition a flag ("1": must equal the value that
-- follows, "0": must be absent, followed by an ignored ""), then the np put values.
-- Returns 1 if applied; else the current value of every condition key (nil: absent), so
-- that a caller who guessed them wrong learns them without a second round trip.
local nc, np = tonumber(ARGV[1]), tonumber(ARGV[2])
-- Both kinds of write are checked first: the puts must not happen without the deletes.
if np > 0 then check('SET', KEYS[nc + 1], '') end
if #KEYS > nc + np then check('DEL', KEYS[nc + np + 1]) end
local current, holds = {}, true
for i = 1, nc do
    current[i] = redis.call('GET', KEYS[i])
    if ARGV[1 + 2 * i] == '1' then
        if current[i] ~= ARGV[2 + 2 * i] then holds = false end
    elseif current[i] then
        holds = false
    end
end
if not holds then return current end
for i = 1, np do
    redis.call('SET', KEYS[nc + i], ARGV[2 + 2 * nc + i])
end
for i = nc + np + 1, #KEYS do
    redis.call('DEL', KEYS[i])
end
return 1
