-- Fair lock scripts begin with this (dcoord/backends/redis/locks.py joins the files):
-- drop dead waiters from the head of the queue. One further back blocks nobody until it
-- gets there, and dropping only at the head keeps a script's cost independent of the
-- queue's length. Every fair script has the same keys: KEYS[1] the lock key, KEYS[2] its
-- fence counter, KEYS[3] the waiters' queue (a list of tokens in arrival order), KEYS[4]
-- each waiter's expiry (a zset, ms of server time); all carry the lock's hash tag.
-- Leaves `now` (server ms), `head` (the live head's token, or false) and `purged`.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local head = redis.call('LINDEX', KEYS[3], 0)
local purged = false
while head do
  local expires = redis.call('ZSCORE', KEYS[4], head)
  if expires and tonumber(expires) > now then
    break
  end
  redis.call('LPOP', KEYS[3])
  redis.call('ZREM', KEYS[4], head)
  purged = true
  head = redis.call('LINDEX', KEYS[3], 0)
end
