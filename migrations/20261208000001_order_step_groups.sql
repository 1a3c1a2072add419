-- Group commit of the order branch's TCC steps: the same step of several
-- payments, collected by the api while one group is in the database
-- (workers/src/group_commit.rs), runs as one local transaction in one round
-- trip, so a burst of payments pays one commit per group, not one per step.
-- A group of one is the step alone. Each item is the step it was on its
-- own, behind its own savepoint: an item the database refuses (a fence
-- contradicted by its order row, SQLSTATE 45000) is undone alone and
-- answered `inconsistent: …`; any other error (a deadlock) rolls the whole
-- group back and reaches the caller, who runs it again. Items are taken in
-- the order given, which the caller sorts by the row each locks first, so
-- two groups never wait on each other in a cycle. Each procedure answers
-- one row: a JSON array of outcomes, one per item, in the same order.

DROP PROCEDURE order_try;
DROP PROCEDURE order_end;

-- Try, per item `[tx_id, user_id, order_id, log (0|1), amount_cents, mode]`:
-- log the transaction as `started` (when `log`) and hold the order
-- (`unpaid → paying`, only the buyer's own, only before it expires):
-- `held`, `repeat` or `refused`. A refused Try keeps nothing, not even its
-- fence row (a later Cancel is empty); with a log it is logged `aborted`
-- for `p_refused_reason` instead.
CREATE PROCEDURE order_try_group(
    IN p_items LONGTEXT,
    IN p_refused_reason VARCHAR(64) CHARACTER SET ascii
)
SQL SECURITY INVOKER
BEGIN
    DECLARE v_left INT DEFAULT JSON_LENGTH(p_items);
    DECLARE v_outcomes LONGTEXT DEFAULT '[]';
    DECLARE v_tx_id CHAR(32) CHARACTER SET ascii;
    DECLARE v_user_id BIGINT UNSIGNED;
    DECLARE v_order_id CHAR(36) CHARACTER SET ascii;
    DECLARE v_log TINYINT;
    DECLARE v_amount_cents BIGINT;
    DECLARE v_mode VARCHAR(8) CHARACTER SET ascii;
    DECLARE v_start VARCHAR(16) CHARACTER SET ascii;
    DECLARE v_outcome VARCHAR(16) CHARACTER SET ascii;
    DECLARE items CURSOR FOR
        SELECT * FROM JSON_TABLE(p_items, '$[*]' COLUMNS (
            tx_id VARCHAR(32) PATH '$[0]',
            user_id BIGINT UNSIGNED PATH '$[1]',
            order_id VARCHAR(36) PATH '$[2]',
            log TINYINT PATH '$[3]',
            amount_cents BIGINT PATH '$[4]',
            mode VARCHAR(8) PATH '$[5]'
        )) AS item;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
    OPEN items;
    -- Exactly as many fetches as items: a NOT FOUND handler here would also
    -- catch a called procedure's empty SELECT … INTO and end the loop.
    WHILE v_left > 0 DO
        FETCH items INTO v_tx_id, v_user_id, v_order_id, v_log, v_amount_cents, v_mode;
        SET v_left = v_left - 1;
        SAVEPOINT item;
        IF v_log THEN
            INSERT INTO pay_transactions (tx_id, order_id, user_id, amount_cents, mode, state)
                VALUES (v_tx_id, v_order_id, v_user_id, v_amount_cents, v_mode, 'started');
        END IF;
        CALL fence_try(v_tx_id, 'order', v_order_id, 0, v_order_id, v_start);
        IF v_start = 'fresh' THEN
            UPDATE orders SET status = 'paying'
                WHERE id = v_order_id AND user_id = v_user_id AND status = 'unpaid'
                  AND expires_at > NOW(3);
            SET v_outcome = IF(ROW_COUNT() = 1, 'held', 'refused');
        ELSE
            SET v_outcome = IF(v_start = 'repeat', 'repeat', 'refused');
        END IF;
        IF v_outcome = 'refused' AND v_start = 'fresh' THEN
            ROLLBACK TO SAVEPOINT item;
            IF v_log THEN
                INSERT INTO pay_transactions
                    (tx_id, order_id, user_id, amount_cents, mode, state, reason)
                    VALUES (v_tx_id, v_order_id, v_user_id, v_amount_cents, v_mode, 'aborted',
                            p_refused_reason);
            END IF;
        END IF;
        SET v_outcomes = JSON_ARRAY_APPEND(v_outcomes, '$', v_outcome);
    END WHILE;
    CLOSE items;
    COMMIT;
    SELECT v_outcomes AS outcomes;
END;

-- Confirm or Cancel, per item `[tx_id, phase, decide (0|1)]`: with
-- `decide`, first the coordinator's decision `started → committing`
-- (`not_decided`, nothing done, when the log had moved on); then
-- order_end_in: `done`, `repeat`, `empty_rollback` or `refused`.
CREATE PROCEDURE order_end_group(IN p_items LONGTEXT)
SQL SECURITY INVOKER
BEGIN
    DECLARE v_left INT DEFAULT JSON_LENGTH(p_items);
    DECLARE v_outcomes LONGTEXT DEFAULT '[]';
    DECLARE v_tx_id CHAR(32) CHARACTER SET ascii;
    DECLARE v_phase VARCHAR(8) CHARACTER SET ascii;
    DECLARE v_decide TINYINT;
    DECLARE v_outcome VARCHAR(255) CHARACTER SET utf8mb4;
    DECLARE items CURSOR FOR
        SELECT * FROM JSON_TABLE(p_items, '$[*]' COLUMNS (
            tx_id VARCHAR(32) PATH '$[0]',
            phase VARCHAR(8) PATH '$[1]',
            decide TINYINT PATH '$[2]'
        )) AS item;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
    OPEN items;
    WHILE v_left > 0 DO
        FETCH items INTO v_tx_id, v_phase, v_decide;
        SET v_left = v_left - 1;
        SET v_outcome = NULL;
        SAVEPOINT item;
        IF v_decide THEN
            UPDATE pay_transactions SET state = 'committing'
                WHERE tx_id = v_tx_id AND state = 'started';
            IF ROW_COUNT() <> 1 THEN
                SET v_outcome = 'not_decided';
            END IF;
        END IF;
        IF v_outcome IS NULL THEN
            step: BEGIN
                DECLARE EXIT HANDLER FOR SQLSTATE '45000' BEGIN
                    GET DIAGNOSTICS CONDITION 1 v_outcome = MESSAGE_TEXT;
                    ROLLBACK TO SAVEPOINT item;
                END;
                CALL order_end_in(v_tx_id, v_phase, v_outcome);
            END step;
        END IF;
        SET v_outcomes = JSON_ARRAY_APPEND(v_outcomes, '$', v_outcome);
    END WHILE;
    CLOSE items;
    COMMIT;
    SELECT v_outcomes AS outcomes;
END;
