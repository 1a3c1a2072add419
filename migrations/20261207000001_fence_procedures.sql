-- The TCC fence's state machine (see workers/src/payments/fence.rs for the
-- table it implements), as stored procedures, so a branch step runs in the
-- database in one round trip instead of one per statement. The wallet's
-- database holds the same file (migrations/wallet/); a unit test keeps
-- the two identical. None of these procedures starts or ends a
-- transaction: they run inside their caller's. Every procedure of the
-- payment steps runs with its caller's privileges (SQL SECURITY INVOKER),
-- so a database restored under another account keeps working. Text
-- parameters and variables are ascii, the key columns' character set: a
-- utf8mb4 value compared with an ascii key cannot use its index, and the
-- step would scan and lock the whole table (a test counts scanned rows).

-- Try: `fresh` (this call inserted the row: hold the resource now),
-- `repeat` (tried or confirmed before) or `suspended` (cancelled first).
CREATE PROCEDURE fence_try(
    IN p_tx_id CHAR(32) CHARACTER SET ascii,
    IN p_branch VARCHAR(16) CHARACTER SET ascii,
    IN p_resource VARCHAR(64) CHARACTER SET ascii,
    IN p_amount_cents BIGINT,
    IN p_order_id CHAR(36) CHARACTER SET ascii,
    OUT p_start VARCHAR(16) CHARACTER SET ascii
)
SQL SECURITY INVOKER
BEGIN
    DECLARE v_phase VARCHAR(8) CHARACTER SET ascii DEFAULT NULL;
    INSERT IGNORE INTO tcc_fences (tx_id, branch, phase, resource, amount_cents, order_id)
        VALUES (p_tx_id, p_branch, 'try', p_resource, p_amount_cents, p_order_id);
    IF ROW_COUNT() = 1 THEN
        SET p_start = 'fresh';
    ELSE
        SELECT phase INTO v_phase FROM tcc_fences
            WHERE tx_id = p_tx_id AND branch = p_branch FOR UPDATE;
        SET p_start = IF(v_phase = 'cancel', 'suspended', 'repeat');
    END IF;
END;

-- Confirm or Cancel (`p_phase`): `apply` (what the Try held is in the
-- OUT columns: move it, then fence_finish), `repeat`, `empty_rollback`
-- (a Cancel with no Try before it, recorded) or `refused` (decided the
-- other way, or a Confirm with no Try).
CREATE PROCEDURE fence_end(
    IN p_tx_id CHAR(32) CHARACTER SET ascii,
    IN p_branch VARCHAR(16) CHARACTER SET ascii,
    IN p_phase VARCHAR(8) CHARACTER SET ascii,
    OUT p_start VARCHAR(16) CHARACTER SET ascii,
    OUT p_resource VARCHAR(64) CHARACTER SET ascii,
    OUT p_amount_cents BIGINT,
    OUT p_order_id CHAR(36) CHARACTER SET ascii
)
SQL SECURITY INVOKER
fence: BEGIN
    DECLARE v_phase VARCHAR(8) CHARACTER SET ascii DEFAULT NULL;
    IF p_phase = 'cancel' THEN
        INSERT IGNORE INTO tcc_fences (tx_id, branch, phase, empty_rollback)
            VALUES (p_tx_id, p_branch, 'cancel', 1);
        IF ROW_COUNT() = 1 THEN
            SET p_start = 'empty_rollback';
            LEAVE fence;
        END IF;
    END IF;
    SELECT phase, resource, amount_cents, order_id
        INTO v_phase, p_resource, p_amount_cents, p_order_id
        FROM tcc_fences WHERE tx_id = p_tx_id AND branch = p_branch FOR UPDATE;
    SET p_start = CASE
        WHEN v_phase = 'try' THEN 'apply'
        WHEN v_phase = p_phase THEN 'repeat'
        -- A Cancel whose row exists but cannot be read is one recorded.
        WHEN v_phase IS NULL AND p_phase = 'cancel' THEN 'repeat'
        ELSE 'refused'
    END;
END;

-- The phase the branch reached, after `apply`.
CREATE PROCEDURE fence_finish(
    IN p_tx_id CHAR(32) CHARACTER SET ascii,
    IN p_branch VARCHAR(16) CHARACTER SET ascii,
    IN p_phase VARCHAR(8) CHARACTER SET ascii
)
SQL SECURITY INVOKER
BEGIN
    UPDATE tcc_fences SET phase = p_phase WHERE tx_id = p_tx_id AND branch = p_branch;
END;

-- fence_try and fence_end for a client inside its own transaction: the
-- outcome as a one-row result.
CREATE PROCEDURE fence_try_row(
    IN p_tx_id CHAR(32) CHARACTER SET ascii,
    IN p_branch VARCHAR(16) CHARACTER SET ascii,
    IN p_resource VARCHAR(64) CHARACTER SET ascii,
    IN p_amount_cents BIGINT,
    IN p_order_id CHAR(36) CHARACTER SET ascii
)
SQL SECURITY INVOKER
BEGIN
    DECLARE v_start VARCHAR(16) CHARACTER SET ascii;
    CALL fence_try(p_tx_id, p_branch, p_resource, p_amount_cents, p_order_id, v_start);
    SELECT v_start AS start;
END;

CREATE PROCEDURE fence_end_row(
    IN p_tx_id CHAR(32) CHARACTER SET ascii,
    IN p_branch VARCHAR(16) CHARACTER SET ascii,
    IN p_phase VARCHAR(8) CHARACTER SET ascii
)
SQL SECURITY INVOKER
BEGIN
    DECLARE v_start VARCHAR(16) CHARACTER SET ascii;
    DECLARE v_resource VARCHAR(64) CHARACTER SET ascii;
    DECLARE v_amount_cents BIGINT;
    DECLARE v_order_id CHAR(36) CHARACTER SET ascii;
    CALL fence_end(p_tx_id, p_branch, p_phase, v_start, v_resource, v_amount_cents, v_order_id);
    SELECT v_start AS start, v_resource AS resource, v_amount_cents AS amount_cents,
        v_order_id AS order_id;
END;
