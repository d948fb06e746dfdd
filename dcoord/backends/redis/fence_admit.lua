-- Admit a fencing token for a resource if it is >= every token admitted before.
-- KEYS[1] the resource's highest admitted token; ARGV[1] the token, in decimal without
-- leading zeros (compared as strings: exact for any 64-bit value, unlike Lua numbers).
-- Returns 1 if admitted (and recorded), 0 if a greater token was admitted before.
local highest = redis.call('GET', KEYS[1])
if highest then
  if #highest > #ARGV[1] or (#highest == #ARGV[1] and highest > ARGV[1]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
