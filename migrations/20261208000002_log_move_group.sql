-- The coordinator's log moves (workers/src/payments/log.rs) of several
-- payments in one transaction and one round trip (group commit, see
-- workers/src/group_commit.rs): per item `[tx_id, from, to, reason]` (an
-- empty reason keeps the row's), the same guarded UPDATE a move alone is,
-- the one that changed the row decided: `moved` or `stayed`. Items run in
-- the order given; two moves of one transaction from the same state in
-- one group (a decision racing recovery's) move it once, as they would
-- one after the other.
CREATE PROCEDURE log_move_group(IN p_items LONGTEXT)
SQL SECURITY INVOKER
BEGIN
    DECLARE v_left INT DEFAULT JSON_LENGTH(p_items);
    DECLARE v_outcomes LONGTEXT DEFAULT '[]';
    DECLARE v_tx_id CHAR(32) CHARACTER SET ascii;
    DECLARE v_from VARCHAR(16) CHARACTER SET ascii;
    DECLARE v_to VARCHAR(16) CHARACTER SET ascii;
    DECLARE v_reason VARCHAR(64) CHARACTER SET ascii;
    DECLARE items CURSOR FOR
        SELECT * FROM JSON_TABLE(p_items, '$[*]' COLUMNS (
            tx_id VARCHAR(32) PATH '$[0]',
            from_state VARCHAR(16) PATH '$[1]',
            to_state VARCHAR(16) PATH '$[2]',
            reason VARCHAR(64) PATH '$[3]'
        )) AS item;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
    OPEN items;
    -- Exactly as many fetches as items (see *_step_groups.sql).
    WHILE v_left > 0 DO
        FETCH items INTO v_tx_id, v_from, v_to, v_reason;
        SET v_left = v_left - 1;
        UPDATE pay_transactions SET state = v_to, reason = COALESCE(NULLIF(v_reason, ''), reason)
            WHERE tx_id = v_tx_id AND state = v_from;
        SET v_outcomes = JSON_ARRAY_APPEND(v_outcomes, '$', IF(ROW_COUNT() = 1, 'moved', 'stayed'));
    END WHILE;
    CLOSE items;
    COMMIT;
    SELECT v_outcomes AS outcomes;
END;
