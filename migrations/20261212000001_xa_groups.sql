-- XA payments run in groups: the payments an api has in hand at once share
-- one XA transaction per database (two durable prepares and two commits for
-- the whole group, not per payment). `xa_group` names the group's branches
-- (their gtrid); every member's row carries it, and the group's decision is
-- one statement over its members. A transaction logged before groups was a
-- group of one named by its own id.
ALTER TABLE pay_transactions
    ADD COLUMN xa_group CHAR(32) CHARACTER SET ascii NULL AFTER mode,
    ADD KEY idx_pay_tx_xa_group (xa_group, state);

UPDATE pay_transactions SET xa_group = tx_id WHERE mode = 'xa';
