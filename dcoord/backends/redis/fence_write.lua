-- Admit a fencing token (as fence_admit.lua) and, only if admitted, write a value, in one
-- atomic step: a stale holder can never write between the check and the write.
-- KEYS[1] the resource's highest admitted token, KEYS[2] the key to write;
-- ARGV[1] the token in decimal without leading zeros, ARGV[2] the value.
-- Returns 1 if admitted and written, 0 (nothing written) if a greater token was admitted.
local highest = redis.call('GET', KEYS[1])
if highest then
  if #highest > #ARGV[1] or (#highest == #ARGV[1] and highest > ARGV[1]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
return 1
