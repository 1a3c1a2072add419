-- Sliding-window limiter: at most ARGV[1] events per ARGV[2] milliseconds
-- per key, counted exactly (one sorted-set member per admitted event).
--
-- KEYS[1] the window's sorted set
-- ARGV[1] limit, ARGV[2] window_ms, ARGV[3] a unique member for this event
--
-- Uses the Redis server clock so every gateway counts on one timeline.
-- Returns {1, 0} when admitted, {0, retry_after_ms} when over the limit.
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return {1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local retry = window
if oldest[2] then
  retry = tonumber(oldest[2]) + window - now
end
if retry < 1 then retry = 1 end
return {0, retry}
