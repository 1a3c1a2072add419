-- Group commit of the wallet branch's TCC steps: the same step of several
-- payments, collected by the wallet service while one group is in the
-- database (workers/src/group_commit.rs), runs as one local transaction in
-- one round trip, so a burst of payments pays one commit per group, not one
-- per step. A group of one is the step alone. Each item is the step it was
-- on its own, behind its own savepoint: an item the database refuses (a
-- fence whose frozen money is not there, SQLSTATE 45000) is undone alone
-- and answered `inconsistent: …`; any other error (a deadlock) rolls the
-- whole group back and reaches the caller, who runs it again. Items are
-- taken in the order given, which the caller sorts by the row each locks
-- first. Each procedure answers one row: a JSON array of outcomes, one per
-- item, in the same order.

DROP PROCEDURE wallet_try;
DROP PROCEDURE wallet_end;

-- Try, per item `[tx_id, user_id, order_id, amount_cents]`: freeze the
-- order's amount: `frozen`, `repeat`, `suspended` or `insufficient_funds`
-- (nothing kept, not even the fence row: a later Cancel is empty).
CREATE PROCEDURE wallet_try_group(IN p_items LONGTEXT)
SQL SECURITY INVOKER
BEGIN
    DECLARE v_left INT DEFAULT JSON_LENGTH(p_items);
    DECLARE v_outcomes LONGTEXT DEFAULT '[]';
    DECLARE v_tx_id CHAR(32) CHARACTER SET ascii;
    DECLARE v_user_id BIGINT UNSIGNED;
    DECLARE v_order_id CHAR(36) CHARACTER SET ascii;
    DECLARE v_amount_cents BIGINT;
    DECLARE v_start VARCHAR(32) CHARACTER SET ascii;
    DECLARE v_moved TINYINT;
    DECLARE items CURSOR FOR
        SELECT * FROM JSON_TABLE(p_items, '$[*]' COLUMNS (
            tx_id VARCHAR(32) PATH '$[0]',
            user_id BIGINT UNSIGNED PATH '$[1]',
            order_id VARCHAR(36) PATH '$[2]',
            amount_cents BIGINT PATH '$[3]'
        )) AS item;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
    OPEN items;
    -- Exactly as many fetches as items: a NOT FOUND handler here would also
    -- catch a called procedure's empty SELECT … INTO and end the loop.
    WHILE v_left > 0 DO
        FETCH items INTO v_tx_id, v_user_id, v_order_id, v_amount_cents;
        SET v_left = v_left - 1;
        SET v_moved = 0;
        SAVEPOINT item;
        CALL fence_try(v_tx_id, 'wallet', v_user_id, v_amount_cents, v_order_id, v_start);
        IF v_start = 'fresh' THEN
            CALL wallet_move(v_user_id, 'freeze', v_amount_cents, 0, v_order_id, v_tx_id,
                             v_moved);
            IF v_moved = 1 THEN
                SET v_start = 'frozen';
            ELSE
                ROLLBACK TO SAVEPOINT item;
                SET v_start = 'insufficient_funds';
            END IF;
        END IF;
        SET v_outcomes = JSON_ARRAY_APPEND(v_outcomes, '$', v_start);
    END WHILE;
    CLOSE items;
    COMMIT;
    SELECT v_outcomes AS outcomes;
END;

-- Confirm (the frozen amount is spent: the order's one debit) or Cancel
-- (it goes back to the balance), per item `[tx_id, phase]`: `done`,
-- `repeat`, `empty_rollback` or `refused` (see fence_end).
CREATE PROCEDURE wallet_end_group(IN p_items LONGTEXT)
SQL SECURITY INVOKER
BEGIN
    DECLARE v_left INT DEFAULT JSON_LENGTH(p_items);
    DECLARE v_outcomes LONGTEXT DEFAULT '[]';
    DECLARE v_tx_id CHAR(32) CHARACTER SET ascii;
    DECLARE v_phase VARCHAR(8) CHARACTER SET ascii;
    DECLARE v_outcome VARCHAR(255) CHARACTER SET utf8mb4;
    DECLARE items CURSOR FOR
        SELECT * FROM JSON_TABLE(p_items, '$[*]' COLUMNS (
            tx_id VARCHAR(32) PATH '$[0]',
            phase VARCHAR(8) PATH '$[1]'
        )) AS item;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
    OPEN items;
    WHILE v_left > 0 DO
        FETCH items INTO v_tx_id, v_phase;
        SET v_left = v_left - 1;
        SAVEPOINT item;
        step: BEGIN
            DECLARE EXIT HANDLER FOR SQLSTATE '45000' BEGIN
                GET DIAGNOSTICS CONDITION 1 v_outcome = MESSAGE_TEXT;
                ROLLBACK TO SAVEPOINT item;
            END;
            CALL wallet_end_in(v_tx_id, v_phase, v_outcome);
        END step;
        SET v_outcomes = JSON_ARRAY_APPEND(v_outcomes, '$', v_outcome);
    END WHILE;
    CLOSE items;
    COMMIT;
    SELECT v_outcomes AS outcomes;
END;

-- One Confirm or Cancel inside the caller's transaction.
CREATE PROCEDURE wallet_end_in(
    IN p_tx_id CHAR(32) CHARACTER SET ascii,
    IN p_phase VARCHAR(8) CHARACTER SET ascii,
    OUT p_outcome VARCHAR(255) CHARACTER SET utf8mb4
)
SQL SECURITY INVOKER
BEGIN
    DECLARE v_start VARCHAR(16) CHARACTER SET ascii;
    DECLARE v_resource VARCHAR(64) CHARACTER SET ascii;
    DECLARE v_amount_cents BIGINT;
    DECLARE v_order_id CHAR(36) CHARACTER SET ascii;
    DECLARE v_moved TINYINT DEFAULT 0;
    CALL fence_end(p_tx_id, 'wallet', p_phase, v_start, v_resource, v_amount_cents, v_order_id);
    IF v_start = 'apply' THEN
        IF v_resource NOT REGEXP '^[0-9]+$' THEN
            SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'inconsistent: the fence holds no user id';
        END IF;
        IF v_order_id IS NULL THEN
            -- A fence written before it kept the order: the Try's ledger row has it.
            SELECT order_id INTO v_order_id FROM wallet_ledger
                WHERE tx_id = p_tx_id AND kind = 'freeze';
        END IF;
        CALL wallet_move(CAST(v_resource AS UNSIGNED), IF(p_phase = 'confirm', 'debit', 'unfreeze'),
                         v_amount_cents, 1, v_order_id, p_tx_id, v_moved);
        IF v_moved <> 1 THEN
            SIGNAL SQLSTATE '45000'
                SET MESSAGE_TEXT = 'inconsistent: the frozen amount is not there';
        END IF;
        CALL fence_finish(p_tx_id, 'wallet', p_phase);
        SET v_start = 'done';
    END IF;
    SET p_outcome = v_start;
END;
