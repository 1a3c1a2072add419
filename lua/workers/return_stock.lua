-- Gives a closed order's unit back to the Redis stock counter, once.
--
-- KEYS: 1 stock counter, 2 returned set (order ids whose unit came back)
-- ARGV: 1 order id
--
-- Returns  the stock counter after the call (>= 1) when the unit went back now
--          0 when this order's unit had gone back before (a retried close,
--            the sweeper finishing a return, or a reconcile that rebuilt the
--            stock from MySQL and listed the order as returned)
--         -1 when the stock counter is missing (Redis lost the sale): nothing
--            is written; the reconciler rebuilds the stock from MySQL, where
--            the unit is already back
-- The buyer marker is left in place: a buyer has at most one order per sale
-- whatever its status (SPEC invariant 2), so a closed order still counts.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then
  return 0
end
return redis.call('INCR', KEYS[1])
