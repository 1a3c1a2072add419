-- Movements of money and the wallet branch's TCC steps
-- (workers/src/wallet/accounts.rs and tcc.rs) as stored procedures: a Try
-- or a Confirm costs the database one call instead of five or six
-- statements. Each step answers one row with its outcome, and any error
-- rolls it back whole before it reaches the caller, so a connection never
-- goes back to its pool mid-transaction.

-- One movement of money, inside the caller's transaction: the guarded
-- update of the wallet row plus its ledger row with the balances after it.
-- `p_moved` is 0 (nothing written) when the wallet lacks the money.
--   credit, refund  balance + x (creates the row)
--   freeze          balance - x, frozen + x        (TCC Try)
--   unfreeze        balance + x, frozen - x        (TCC Cancel)
--   debit           frozen - x when p_from_frozen (TCC Confirm), else balance - x
CREATE PROCEDURE wallet_move(
    IN p_user_id BIGINT UNSIGNED,
    IN p_kind VARCHAR(16) CHARACTER SET ascii,
    IN p_amount_cents BIGINT,
    IN p_from_frozen TINYINT,
    IN p_order_id CHAR(36) CHARACTER SET ascii,
    IN p_tx_id CHAR(32) CHARACTER SET ascii,
    OUT p_moved TINYINT
)
SQL SECURITY INVOKER
BEGIN
    DECLARE v_balance BIGINT;
    DECLARE v_frozen BIGINT;
    SET v_balance = CASE p_kind
        WHEN 'credit' THEN p_amount_cents WHEN 'refund' THEN p_amount_cents
        WHEN 'freeze' THEN -p_amount_cents WHEN 'unfreeze' THEN p_amount_cents
        WHEN 'debit' THEN IF(p_from_frozen, 0, -p_amount_cents) END;
    SET v_frozen = CASE p_kind
        WHEN 'freeze' THEN p_amount_cents WHEN 'unfreeze' THEN -p_amount_cents
        WHEN 'debit' THEN IF(p_from_frozen, -p_amount_cents, 0) ELSE 0 END;
    IF v_balance IS NULL THEN
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'unknown movement kind';
    END IF;
    IF p_kind IN ('credit', 'refund') THEN
        INSERT INTO wallets (user_id, balance_cents) VALUES (p_user_id, v_balance)
            ON DUPLICATE KEY UPDATE balance_cents = balance_cents + VALUES(balance_cents);
        SET p_moved = 1;
    ELSE
        UPDATE wallets
            SET balance_cents = balance_cents + v_balance, frozen_cents = frozen_cents + v_frozen
            WHERE user_id = p_user_id AND balance_cents + v_balance >= 0
              AND frozen_cents + v_frozen >= 0;
        SET p_moved = ROW_COUNT();
    END IF;
    IF p_moved = 1 THEN
        INSERT INTO wallet_ledger
            (user_id, kind, amount_cents, balance_after, frozen_after, order_id, tx_id)
            SELECT user_id, p_kind, p_amount_cents, balance_cents, frozen_cents, p_order_id, p_tx_id
            FROM wallets WHERE user_id = p_user_id;
    END IF;
END;

-- wallet_move for a client inside its own transaction (an XA branch, a
-- message-mode debit, a top-up).
CREATE PROCEDURE wallet_move_row(
    IN p_user_id BIGINT UNSIGNED,
    IN p_kind VARCHAR(16) CHARACTER SET ascii,
    IN p_amount_cents BIGINT,
    IN p_from_frozen TINYINT,
    IN p_order_id CHAR(36) CHARACTER SET ascii,
    IN p_tx_id CHAR(32) CHARACTER SET ascii
)
SQL SECURITY INVOKER
BEGIN
    DECLARE v_moved TINYINT;
    CALL wallet_move(p_user_id, p_kind, p_amount_cents, p_from_frozen, p_order_id, p_tx_id,
                     v_moved);
    SELECT v_moved AS moved;
END;

-- Try: freeze the order's amount: `frozen`, `repeat`, `suspended` or
-- `insufficient_funds` (nothing kept, not even the fence row: a later
-- Cancel is empty).
CREATE PROCEDURE wallet_try(
    IN p_tx_id CHAR(32) CHARACTER SET ascii,
    IN p_user_id BIGINT UNSIGNED,
    IN p_order_id CHAR(36) CHARACTER SET ascii,
    IN p_amount_cents BIGINT
)
SQL SECURITY INVOKER
BEGIN
    DECLARE v_start VARCHAR(16) CHARACTER SET ascii;
    DECLARE v_moved TINYINT DEFAULT 0;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
    CALL fence_try(p_tx_id, 'wallet', p_user_id, p_amount_cents, p_order_id, v_start);
    IF v_start = 'fresh' THEN
        CALL wallet_move(p_user_id, 'freeze', p_amount_cents, 0, p_order_id, p_tx_id, v_moved);
        IF v_moved = 1 THEN
            COMMIT;
            SELECT 'frozen' AS outcome;
        ELSE
            ROLLBACK;
            SELECT 'insufficient_funds' AS outcome;
        END IF;
    ELSE
        COMMIT;
        SELECT v_start AS outcome;
    END IF;
END;

-- Confirm (the frozen amount is spent: the order's one debit) or Cancel
-- (it goes back to the balance): `done`, `repeat`, `empty_rollback` or
-- `refused` (see fence_end).
CREATE PROCEDURE wallet_end(
    IN p_tx_id CHAR(32) CHARACTER SET ascii,
    IN p_phase VARCHAR(8) CHARACTER SET ascii
)
SQL SECURITY INVOKER
BEGIN
    DECLARE v_start VARCHAR(16) CHARACTER SET ascii;
    DECLARE v_resource VARCHAR(64) CHARACTER SET ascii;
    DECLARE v_amount_cents BIGINT;
    DECLARE v_order_id CHAR(36) CHARACTER SET ascii;
    DECLARE v_moved TINYINT DEFAULT 0;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
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
    COMMIT;
    SELECT v_start AS outcome;
END;
