-- One step of a leader election. KEYS[1] the leader record, a hash {token, term, value}
-- with the leader's TTL; KEYS[2] the last term handed out (never expires). Both carry the
-- election's hash tag. ARGV[1] the step, ARGV[2] the candidate's token, ARGV[3] the TTL
-- in milliseconds, ARGV[4] the value, ARGV[5] the channel told of every change.
-- campaign: the term (> 0) if elected, else -(the leader's remaining TTL in ms), a wait
-- hint. extend / proclaim / resign: 1 if the token leads (and the step was done), else 0.
local step = ARGV[1]
if step == 'campaign' then
  -- PTTL, not EXISTS: the namespace ACL rule (docs/security.md) grants no EXISTS, and
  -- -2 (no key) says the same.
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl ~= -2 then
    if pttl < 0 then
      return 0
    end
    return -pttl
  end
  -- The same fence as acquire.lua: max(last + 1, server time in microseconds), so that
  -- terms keep increasing even if the counter was lost with a server restart.
  local now = redis.call('TIME')
  local term = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local last = tonumber(redis.call('GET', KEYS[2]) or '0')
  if last >= term then
    term = last + 1
  end
  local text = string.format('%.0f', term)
  redis.call('SET', KEYS[2], text)
  redis.call('HSET', KEYS[1], 'token', ARGV[2], 'term', text, 'value', ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PUBLISH', ARGV[5], text)
  return term
end
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[2] then
  return 0
end
if step == 'extend' then
  return redis.call('PEXPIRE', KEYS[1], ARGV[3])
elseif step == 'proclaim' then
  redis.call('HSET', KEYS[1], 'value', ARGV[4])
elseif step == 'resign' then
  redis.call('DEL', KEYS[1])
else
  return redis.error_reply('unknown election step ' .. step)
end
redis.call('PUBLISH', ARGV[5], step)
return 1
