-- The XA group a debit was prepared in (the branch's gtrid), written in
-- the branch itself: once the branch is gone, a ledger row naming the group
-- says it committed, and none says it rolled back (or never prepared).
-- Debits prepared before groups name their branch by their own tx_id.
ALTER TABLE wallet_ledger
    ADD COLUMN xa_group CHAR(32) CHARACTER SET ascii NULL AFTER tx_id,
    ADD KEY idx_ledger_xa_group (xa_group);
