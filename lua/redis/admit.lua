-- One flash-sale admission, atomically, in one round trip.
--
-- KEYS (one sale, one hash tag, so one slot on Redis Cluster):
--   1 info hash   2 stock counter   3 buyers set   4 reservations hash
--   5 this user's hidden path   6 this user's sliding-window zset
-- ARGV: 1 user_id, 2 path from the URL, 3 request_id,
--       4 attempts allowed per window, 5 window_ms
--
-- Checks run cheapest-first and nothing is written until the request is
-- known to be admissible, except the limiter's own count:
--   not_ready    the sale's keys are missing (Redis restarted, flushed, or
--                never warmed): fail closed, never sell blind
--   not_started  {starts_at_ms}          ended
--   sold_out     the stock counter is 0: before anything about the buyer,
--                because the sale's state is public (GET /sales) and every
--                request after a sell-out, whatever its path, must let the
--                gateway set its local sold-out mark; it also writes nothing
--                (no limiter count) for the crowd that keeps clicking
--   bad_path     the path is missing, expired or not this user's
--   limited      {retry_after_ms}        this user tried too often
--   duplicate    the user is already queued or bought (stock untouched)
--   admitted     {admitted_ms, stock_left}: stock decremented, the buyer
--                marked, the reservation "<request_id>:<admitted_ms>" kept
--                until a worker settles it or it is released
-- Times come from the Redis server clock so every gateway agrees.
-- The limiter mirrors sliding_window.lua (scripts cannot include each other).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local window = redis.call('HMGET', KEYS[1], 'starts_at_ms', 'ends_at_ms')
local stock = redis.call('GET', KEYS[2])
if not window[1] or not window[2] or not stock then
  return {'not_ready'}
end
local starts, ends = tonumber(window[1]), tonumber(window[2])
if now < starts then
  return {'not_started', starts}
end
if now >= ends then
  return {'ended'}
end
if tonumber(stock) <= 0 then
  return {'sold_out'}
end

local expected = redis.call('GET', KEYS[5])
if not expected or expected ~= ARGV[2] then
  return {'bad_path'}
end

local limit, span = tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now - span)
if redis.call('ZCARD', KEYS[6]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[6], 0, 0, 'WITHSCORES')
  local retry = span
  if oldest[2] then retry = tonumber(oldest[2]) + span - now end
  if retry < 1 then retry = 1 end
  return {'limited', retry}
end
redis.call('ZADD', KEYS[6], now, ARGV[3])
redis.call('PEXPIRE', KEYS[6], span)

local user = ARGV[1]
if redis.call('SISMEMBER', KEYS[3], user) == 1 then
  return {'duplicate'}
end
local left = redis.call('DECR', KEYS[2])
redis.call('SADD', KEYS[3], user)
redis.call('HSET', KEYS[4], user, ARGV[3] .. ':' .. now)
return {'admitted', now, left}
