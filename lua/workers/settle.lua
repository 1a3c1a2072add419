-- Settle admissions of one sale after the order worker committed them to MySQL.
--
-- KEYS[1] reservations hash, KEYS[2] stock counter, KEYS[3] buyers set,
-- KEYS[3 + i] the result key of item i (all keys share the sale's hash tag).
-- ARGV[1] result TTL in seconds, then four values per item:
--   user_id, request_id, result JSON, mode
-- mode: "success"   the order exists: clear the reservation;
--       "created"   the order was written by this batch: as "success", and
--                   when neither the reservation nor the buyer marker is
--                   there, take the unit from the counter and mark the buyer:
--                   admit.lua writes the decrement, the marker and the
--                   reservation in one script, so all three were lost
--                   together (a Redis failover's unreplicated writes, or a
--                   rebuild from MySQL before this order existed). The
--                   marker makes a repeat of this call take nothing;
--       "release"   failed: clear the reservation, give the unit back to the
--                   stock counter and remove the buyer marker so they may retry;
--       "duplicate" the buyer already has an order: clear this request's
--                   reservation and give back the unit it took, keep the marker.
--
-- Idempotent: the reservation is only touched when it still holds this
-- request (value "<request_id>:<admitted_ms>" or just "<request_id>"), so a
-- redelivered message never releases stock twice, and a released or
-- reconciled reservation is left alone. The stock counter is only raised
-- when it exists (a Redis restarted empty is rebuilt by the reconciler).
-- The result is overwritten while this request holds the reservation, and
-- otherwise only written when no result exists yet, so a stale redelivery
-- cannot hide a newer result of the same buyer.
-- Returns {units given back to the stock counter, units taken from it}.
local ttl = tonumber(ARGV[1])
local given_back = 0
local taken = 0
local items = (#ARGV - 1) / 4
for i = 0, items - 1 do
  local user = ARGV[2 + i * 4]
  local rid = ARGV[3 + i * 4]
  local json = ARGV[4 + i * 4]
  local mode = ARGV[5 + i * 4]
  local held = redis.call('HGET', KEYS[1], user)
  local mine = held and (held == rid or string.sub(held, 1, #rid + 1) == rid .. ':')
  if mine then
    redis.call('SET', KEYS[3 + i + 1], json, 'EX', ttl)
    redis.call('HDEL', KEYS[1], user)
    if mode == 'release' or mode == 'duplicate' then
      if redis.call('EXISTS', KEYS[2]) == 1 then
        redis.call('INCR', KEYS[2])
        given_back = given_back + 1
      end
    end
    if mode == 'release' then
      redis.call('SREM', KEYS[3], user)
    end
  else
    redis.call('SET', KEYS[3 + i + 1], json, 'EX', ttl, 'NX')
    -- No counter: Redis lost the sale, and the reconciler rebuilds it all.
    if mode == 'created' and redis.call('EXISTS', KEYS[2]) == 1
        and redis.call('SISMEMBER', KEYS[3], user) == 0 then
      redis.call('SADD', KEYS[3], user)
      if tonumber(redis.call('GET', KEYS[2])) > 0 then
        redis.call('DECR', KEYS[2])
        taken = taken + 1
      end
    end
  end
end
return {given_back, taken}
