-- The order branch's TCC steps (workers/src/payments/order_branch.rs), each
-- one local transaction run in one round trip: a payment's order side costs
-- the database two calls instead of eleven statements. Each answers one row
-- with its outcome. Any error rolls the step back whole before it reaches
-- the caller, so a connection never goes back to its pool mid-transaction.

-- Try: log `p_log_tx` as `started` (when given) and hold the order
-- (`unpaid → paying`, only the buyer's own, only before it expires):
-- `held`, `repeat` or `refused`. A refused Try keeps nothing, not even its
-- fence row (a later Cancel is empty); with a log it is logged `aborted`
-- for `p_refused_reason` instead.
CREATE PROCEDURE order_try(
    IN p_tx_id CHAR(32) CHARACTER SET ascii,
    IN p_user_id BIGINT UNSIGNED,
    IN p_order_id CHAR(36) CHARACTER SET ascii,
    IN p_log TINYINT,
    IN p_amount_cents BIGINT,
    IN p_mode VARCHAR(8) CHARACTER SET ascii,
    IN p_refused_reason VARCHAR(64) CHARACTER SET ascii
)
SQL SECURITY INVOKER
BEGIN
    DECLARE v_start VARCHAR(16) CHARACTER SET ascii;
    DECLARE v_outcome VARCHAR(16) CHARACTER SET ascii;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
    IF p_log THEN
        INSERT INTO pay_transactions (tx_id, order_id, user_id, amount_cents, mode, state)
            VALUES (p_tx_id, p_order_id, p_user_id, p_amount_cents, p_mode, 'started');
    END IF;
    CALL fence_try(p_tx_id, 'order', p_order_id, 0, p_order_id, v_start);
    IF v_start = 'fresh' THEN
        UPDATE orders SET status = 'paying'
            WHERE id = p_order_id AND user_id = p_user_id AND status = 'unpaid'
              AND expires_at > NOW(3);
        SET v_outcome = IF(ROW_COUNT() = 1, 'held', 'refused');
    ELSE
        SET v_outcome = IF(v_start = 'repeat', 'repeat', 'refused');
    END IF;
    IF v_outcome = 'refused' AND v_start = 'fresh' THEN
        ROLLBACK;
        IF p_log THEN
            INSERT INTO pay_transactions
                (tx_id, order_id, user_id, amount_cents, mode, state, reason)
                VALUES (p_tx_id, p_order_id, p_user_id, p_amount_cents, p_mode, 'aborted',
                        p_refused_reason);
        END IF;
    ELSE
        COMMIT;
    END IF;
    SELECT v_outcome AS outcome;
END;

-- What Confirm (`paying → paid`) or Cancel (`paying → unpaid`) does to the
-- held order, inside the caller's transaction: `done`, `repeat`,
-- `empty_rollback` or `refused` (see fence_end). The message mode calls it
-- in its own transaction with the message that settles the payment.
CREATE PROCEDURE order_end_in(
    IN p_tx_id CHAR(32) CHARACTER SET ascii,
    IN p_phase VARCHAR(8) CHARACTER SET ascii,
    OUT p_outcome VARCHAR(16) CHARACTER SET ascii
)
SQL SECURITY INVOKER
BEGIN
    DECLARE v_start VARCHAR(16) CHARACTER SET ascii;
    DECLARE v_resource VARCHAR(64) CHARACTER SET ascii;
    DECLARE v_amount_cents BIGINT;
    DECLARE v_order_id CHAR(36) CHARACTER SET ascii;
    CALL fence_end(p_tx_id, 'order', p_phase, v_start, v_resource, v_amount_cents, v_order_id);
    IF v_start = 'apply' THEN
        UPDATE orders
            SET status = IF(p_phase = 'confirm', 'paid', 'unpaid'),
                paid_at = IF(p_phase = 'confirm', NOW(3), NULL)
            WHERE id = v_resource AND status = 'paying';
        IF ROW_COUNT() <> 1 THEN
            SIGNAL SQLSTATE '45000'
                SET MESSAGE_TEXT = 'inconsistent: the order is held by a payment, but not paying';
        END IF;
        CALL fence_finish(p_tx_id, 'order', p_phase);
        SET p_outcome = 'done';
    ELSE
        SET p_outcome = v_start;
    END IF;
END;

-- Confirm or Cancel as a step of its own; with `p_decide`, first the
-- coordinator's decision `started → committing`, in the same transaction
-- (`not_decided`, nothing done, when the log had moved on).
CREATE PROCEDURE order_end(
    IN p_tx_id CHAR(32) CHARACTER SET ascii,
    IN p_phase VARCHAR(8) CHARACTER SET ascii,
    IN p_decide TINYINT
)
SQL SECURITY INVOKER
step: BEGIN
    DECLARE v_outcome VARCHAR(16) CHARACTER SET ascii;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
    IF p_decide THEN
        UPDATE pay_transactions SET state = 'committing'
            WHERE tx_id = p_tx_id AND state = 'started';
        IF ROW_COUNT() <> 1 THEN
            ROLLBACK;
            SELECT 'not_decided' AS outcome;
            LEAVE step;
        END IF;
    END IF;
    CALL order_end_in(p_tx_id, p_phase, v_outcome);
    COMMIT;
    SELECT v_outcome AS outcome;
END;

-- order_end_in for a client inside its own transaction.
CREATE PROCEDURE order_end_in_row(
    IN p_tx_id CHAR(32) CHARACTER SET ascii,
    IN p_phase VARCHAR(8) CHARACTER SET ascii
)
SQL SECURITY INVOKER
BEGIN
    DECLARE v_outcome VARCHAR(16) CHARACTER SET ascii;
    CALL order_end_in(p_tx_id, p_phase, v_outcome);
    SELECT v_outcome AS outcome;
END;
