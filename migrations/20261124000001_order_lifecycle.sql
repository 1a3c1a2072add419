-- Closing an order gives its unit back twice over: to MySQL's stock_left in
-- the closing transaction, and to the Redis stock counter right after. The
-- second step can be cut short (a process dies between the two), so the
-- order remembers whether its unit reached Redis; the sweeper finishes the
-- ones that did not.
ALTER TABLE orders
    ADD COLUMN stock_returned_at DATETIME(3) NULL AFTER closed_at,
    ADD KEY idx_orders_status_returned (status, stock_returned_at);
