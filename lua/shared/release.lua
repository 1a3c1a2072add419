-- Gives back an admission that will not become an order: the gateway's
-- rollback after a failed publish, and the sweeper's release of a
-- reservation whose message never arrived (a gateway died in between).
--
-- KEYS: 1 reservations hash, 2 stock counter, 3 buyers set, 4 released set
-- ARGV: 1 user_id, 2 request_id, 3 seconds to remember the release,
--       4 minimum age in ms (0 = release now; the sweeper passes its
--         timeout so only reservations older than that go)
--
-- Returns  1 released: unit back to stock, buyer unmarked, request id
--            remembered in the released set so a late message is refused
--          0 nothing to do: the reservation is not this request's (already
--            settled or released), or not old enough yet
--         -1 a worker has claimed it (":c"): the message arrived and an
--            order is being written, so the admission stands
local held = redis.call('HGET', KEYS[1], ARGV[1])
if not held then
  return 0
end
local rid = ARGV[2]
if string.sub(held, 1, #rid + 1) ~= rid .. ':' then
  return 0
end
if string.sub(held, -2) == ':c' then
  return -1
end
local admitted = tonumber(string.match(held, ':(%d+)$'))
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if admitted and now - admitted < tonumber(ARGV[4]) then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('INCR', KEYS[2])
end
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], rid)
redis.call('EXPIRE', KEYS[4], tonumber(ARGV[3]))
return 1
