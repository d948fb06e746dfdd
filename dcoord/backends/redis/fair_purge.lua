-- Fair lock scripts begin with this (after lock_fence.lua; locks.py joins the files):
-- drop dead waiters from the head of the queue. One further back blocks nobody until it
-- gets there, and dropping only at the head keeps a script's cost independent of the
-- queue's length. Every fair script has the same keys: KEYS[1] the lock key, KEYS[2] its
-- fence counter, KEYS[3] the waiters' queue (a list of tokens in arrival order), KEYS[4]
-- each waiter's expiry (a zset, ms of server time); all carry the lock's hash tag.
-- Leaves `now` (server ms), `head` (the live head's token, or false), `purged`, and the
-- functions below.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local purged = false

-- The queue's first live waiter (false if none), after dropping the dead ones before it.
local function live_head()
  local head = redis.call('LINDEX', KEYS[3], 0)
  while head do
    local expires = redis.call('ZSCORE', KEYS[4], head)
    if expires and tonumber(expires) > now then
      return head
    end
    redis.call('LPOP', KEYS[3])
    redis.call('ZREM', KEYS[4], head)
    purged = true
    head = redis.call('LINDEX', KEYS[3], 0)
  end
  return false
end

-- A waiter that takes grants says in its token how long its grant lasts and which
-- client it waits in ('<hex>~<ms>~<client tag>|...'); returns those two, or nil for an
-- older client's waiter or one that acquires itself. (The ms are its entry's life: a
-- provisional lease, which its first renewal extends to its TTL; a waiter that died
-- while queued holds the lock no longer than that.)
local function takes_grants(waiter)
  return string.match(waiter, '^%x+~(%d+)~(%x+)|')
end

-- Pass the lock, free or being let go by its holder, to `waiter`, the live head of the
-- queue. A waiter that takes grants is granted here (the lock key set to its token for
-- the ms it says, the next fence counted, its entry removed) and learns it from the message
-- 'granted:<fence>:<token>' on '<channel>:<its client tag>', which only its client
-- hears, with no acquire of its own. An older client's waiter is called on `channel`
-- by 'next:<token>' and acquires. Returns whether it granted.
-- PUBLISH before any write: a denied channel fails the script with nothing granted.
local function hand_over(waiter, channel, margin_us)
  local ttl, tag = takes_grants(waiter)
  if not ttl then
    redis.call('PUBLISH', channel, 'next:' .. waiter)
    return false
  end
  local fence = string.format('%.0f', lock_fence(margin_us))
  redis.call('PUBLISH', channel .. ':' .. tag, 'granted:' .. fence .. ':' .. waiter)
  redis.call('SET', KEYS[1], waiter, 'PX', ttl)
  redis.call('SET', KEYS[2], fence)
  redis.call('LPOP', KEYS[3])
  redis.call('ZREM', KEYS[4], waiter)
  return true
end

local head = live_head()
