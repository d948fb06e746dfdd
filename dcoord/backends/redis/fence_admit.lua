-- Admit a fencing token for a resource if it is >= every token admitted before and, with
-- a second key, write a value in the same atomic step (a stale holder can never write
-- between the check and the write).
-- KEYS[1] the resource's highest admitted token; KEYS[2] (optional) the key to write.
-- ARGV[1] the token, in decimal without leading zeros (compared as strings: exact for any
-- 64-bit value, unlike Lua numbers); ARGV[2] the value, with KEYS[2].
-- Returns 1 if admitted (recorded, and written), 0 (nothing changed) if a greater token
-- was admitted before.
local highest = redis.call('GET', KEYS[1])
if highest then
  if #highest > #ARGV[1] or (#highest == #ARGV[1] and highest > ARGV[1]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1])
if KEYS[2] then
  redis.call('SET', KEYS[2], ARGV[2])
end
return 1
