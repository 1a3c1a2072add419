-- Rebuilds one sale's admission state from MySQL (the reconciler, after
-- Redis lost it or drifted). Runs while the sale is paused (stock counter
-- deleted, so admission fails closed) and MySQL's sale row is locked.
--
-- KEYS: 1 stock counter, 2 buyers set, 3 returned set, 4 reservations hash,
--       5 released set
-- ARGV: 1 stock (MySQL stock_left), 2 seconds to remember released ids,
--       3 number of buyers B, then B user ids (every order of the sale,
--       whatever its status: one order per buyer and sale, SPEC invariant 2),
--       then the number of returned orders R and R order ids (closed orders,
--       whose unit MySQL's stock_left already holds),
--       then the number of reservations to release L and L pairs
--       user_id, request_id (unclaimed reservations whose message never came)
--
-- Returns {"ok", stock} or {"busy", user_id} when a worker holds a claimed
-- reservation (":c"): an order is being written and is not in MySQL's
-- figures yet, so the caller waits and tries again. Nothing is written then.
local function sadd_all(key, first, count)
  local i = first
  local last = first + count - 1
  while i <= last do
    local j = math.min(i + 999, last)
    redis.call('SADD', key, unpack(ARGV, i, j))
    i = j + 1
  end
end

local claimed = redis.call('HGETALL', KEYS[4])
for i = 2, #claimed, 2 do
  if string.sub(claimed[i], -2) == ':c' then
    return {'busy', claimed[i - 1]}
  end
end

local stock = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local b = tonumber(ARGV[3])
local r = tonumber(ARGV[4 + b])
local l = tonumber(ARGV[5 + b + r])

redis.call('DEL', KEYS[2], KEYS[3])
if b > 0 then sadd_all(KEYS[2], 4, b) end
if r > 0 then sadd_all(KEYS[3], 5 + b, r) end
for i = 0, l - 1 do
  local user = ARGV[6 + b + r + i * 2]
  local rid = ARGV[7 + b + r + i * 2]
  local held = redis.call('HGET', KEYS[4], user)
  if held and string.sub(held, 1, #rid + 1) == rid .. ':' then
    redis.call('HDEL', KEYS[4], user)
  end
  redis.call('SADD', KEYS[5], rid)
  redis.call('EXPIRE', KEYS[5], ttl)
end
-- Any reservation left was admitted after the pause began and its unit
-- came from no counter (admission failed closed), so none can exist; a
-- stray one would only ever be refused by the worker's claim.
redis.call('SET', KEYS[1], stock)
return {'ok', stock}
