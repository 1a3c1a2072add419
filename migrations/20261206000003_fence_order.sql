-- The order a fence's Try held money or the order for, so a Confirm or
-- Cancel writes its ledger row without looking the Try's row up again.
-- NULL on rows written before this column existed (their steps look the
-- order up as they did then).
ALTER TABLE tcc_fences ADD COLUMN order_id CHAR(36) CHARACTER SET ascii NULL AFTER amount_cents;
