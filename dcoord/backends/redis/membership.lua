-- Group membership, every operation in one script so that all of them prune first.
--
-- KEYS[1] sorted set: member id -> expiry in ms by the server's clock (TIME)
-- KEYS[2] hash: member id -> payload
-- KEYS[3] hash: member id -> owner token (one per join)
-- KEYS[4] string: the group's epoch, INCRed on every change
-- ARGV[1] the channel changes are published on: each message is the change itself, the
--         JSON array [epoch (a string), op (join | leave | expire), [ids], payload ('' but
--         for a join), ttl in ms (0 but for a join)], so that followers apply it without
--         re-reading the group. (Clients
--         before this published the bare epoch; followers re-read on such a message.)
-- ARGV[2] the operation: join | refresh | leave | read; then its arguments.
--
-- Liveness is decided here, by the server's clock only: clients never compare clocks.

local expiries, payloads, owners, epoch_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local channel, op = ARGV[1], ARGV[2]
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
-- unpack() of very long lists overflows Lua's C stack: work in chunks.
local CHUNK = 1000

-- Every command this operation may write with, checked before the first write (see
-- check.lua): a join denied its PUBLISH used to leave a member id that could never join
-- again.
check('PUBLISH', channel, '0')
check('INCR', epoch_key)
check('ZREM', expiries, '0')
check('HDEL', payloads, '0')
check('HDEL', owners, '0')
if op == 'join' then
  check('ZADD', expiries, '0', '0')
  check('HSET', payloads, '0', '0')
  check('HSET', owners, '0', '0')
elseif op == 'refresh' then
  check('ZADD', expiries, 'XX', '0', '0')
end

-- An out-of-memory server refuses INCR, ZADD and HSET but not ZREM or HDEL, and once a
-- script has written it lets the rest through: every change calls changed() (INCR)
-- before it writes or removes anything, so if the server refuses, nothing happened.
local function changed(what, ids, payload, ttl)
  local epoch = redis.call('INCR', epoch_key)
  redis.call('PUBLISH', channel, cjson.encode({tostring(epoch), what, ids, payload, ttl}))
end

local function remove(ids)
  for i = 1, #ids, CHUNK do
    local part = {unpack(ids, i, math.min(i + CHUNK - 1, #ids))}
    redis.call('ZREM', expiries, unpack(part))
    redis.call('HDEL', payloads, unpack(part))
    redis.call('HDEL', owners, unpack(part))
  end
end

local expired = redis.call('ZRANGEBYSCORE', expiries, '-inf', now)
if #expired > 0 then
  changed('expire', expired, '', 0)
  remove(expired)
end

if op == 'read' then
  local entries = redis.call('ZRANGE', expiries, 0, -1, 'WITHSCORES')
  local ids, soonest = {}, nil
  for i = 1, #entries, 2 do
    ids[#ids + 1] = entries[i]
    local expiry = tonumber(entries[i + 1])
    if soonest == nil or expiry < soonest then soonest = expiry end
  end
  local epoch = tonumber(redis.call('GET', epoch_key) or '0')
  local reply = {epoch, soonest and (soonest - now) or -1}
  for i = 1, #ids, CHUNK do
    local part = {unpack(ids, i, math.min(i + CHUNK - 1, #ids))}
    local values = redis.call('HMGET', payloads, unpack(part))
    for j = 1, #part do
      reply[#reply + 1] = part[j]
      reply[#reply + 1] = values[j] or ''
    end
  end
  return reply
end

local id, token = ARGV[3], ARGV[4]
local owner = redis.call('HGET', owners, id)

if op == 'join' then
  local ttl, payload = tonumber(ARGV[5]), ARGV[6]
  if owner and owner ~= token then return 0 end
  -- The same token again is a retried join whose reply was lost: only extend it.
  if not owner then changed('join', {id}, payload, ttl) end
  redis.call('ZADD', expiries, now + ttl, id)
  if not owner then
    redis.call('HSET', payloads, id, payload)
    redis.call('HSET', owners, id, token)
  end
  return 1
elseif op == 'refresh' then
  if owner ~= token then return 0 end
  -- A heart-beat is not a membership change: no epoch, no notification.
  redis.call('ZADD', expiries, 'XX', now + tonumber(ARGV[5]), id)
  return 1
elseif op == 'leave' then
  if owner ~= token then return 0 end
  changed('leave', {id}, '', 0)
  remove({id})
  return 1
end
return redis.error_reply('unknown membership operation ' .. tostring(op))
