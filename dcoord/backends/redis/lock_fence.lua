-- Shared prefix of acquire.lua and the fair lock scripts (locks.py joins the files):
-- the next fence of the lock whose counter is KEYS[2], read only (the caller writes it
-- once the grant is sure). margin_us: the fence skew margin in microseconds (0: none).
--
-- fence = max(last fence + 1, server time in microseconds): strictly increasing, and a
-- counter that is missing (new lock, or a restarted server that kept nothing on disk)
-- or stale (lost its last writes) still starts above every fence handed out before,
-- since no server grants more than one lock per microsecond, as long as this server's
-- clock is not behind the one that handed them out (docs/locks.md).
local function lock_fence(margin_us)
  local time = redis.call('TIME')
  local fence = tonumber(time[1]) * 1000000 + tonumber(time[2])
  local counter = redis.call('GET', KEYS[2])
  if not counter then
    -- Nothing to go by but the clock: a margin covers a clock that lags the old one's.
    -- (Added to every grant it would cancel out: old fences would carry it too.)
    fence = fence + margin_us
  end
  local last = tonumber(counter or '0')
  if last >= fence then
    fence = last + 1
  end
  return fence
end
