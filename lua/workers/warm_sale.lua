-- Warm (or re-warm) one sale's hot state before it starts.
--
-- KEYS[1] info hash, KEYS[2] stock counter (same hash tag)
-- ARGV: stock, stock_total, starts_at_ms, ends_at_ms, goods_id, sale_price_cents
--
-- The info hash is always rewritten (it only describes the sale). The stock
-- counter is created when missing, and otherwise only ever lowered: a warm-up
-- that runs while the sale is live must never hand out stock twice.
-- Returns the stock counter after the call.
local stock = tonumber(ARGV[1])
redis.call('HSET', KEYS[1],
  'stock_total', ARGV[2],
  'starts_at_ms', ARGV[3],
  'ends_at_ms', ARGV[4],
  'goods_id', ARGV[5],
  'sale_price_cents', ARGV[6])
local current = redis.call('GET', KEYS[2])
if not current or tonumber(current) > stock then
  redis.call('SET', KEYS[2], stock)
  return stock
end
return tonumber(current)
