-- The order worker claims a batch's reservations before writing orders, so
-- a rollback (release.lua) can no longer take them back, and learns which
-- requests were released already (their late messages must not count).
--
-- KEYS: 1 reservations hash, 2 released set (one sale)
-- ARGV: pairs of user_id, request_id
-- Returns one flag per pair: 1 go on (claimed now, claimed before, or not
-- tracked: settled already, or Redis lost the sale's state, where MySQL's
-- guards decide), 0 released: refuse the message.
local out = {}
for i = 1, #ARGV, 2 do
  local user, rid = ARGV[i], ARGV[i + 1]
  if redis.call('SISMEMBER', KEYS[2], rid) == 1 then
    out[#out + 1] = 0
  else
    local held = redis.call('HGET', KEYS[1], user)
    if held and string.sub(held, 1, #rid + 1) == rid .. ':'
        and string.sub(held, -2) ~= ':c' then
      redis.call('HSET', KEYS[1], user, held .. ':c')
    end
    out[#out + 1] = 1
  end
end
return out
