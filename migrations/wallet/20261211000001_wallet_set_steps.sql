-- The wallet branch's TCC steps as set statements: a group whose every
-- item is the plain case (a Try that freezes money the wallet has, a
-- Confirm or Cancel of a frozen amount), each of a different buyer, runs
-- as a few statements for the whole group instead of a loop of about a
-- dozen per item. Anything else in the group (a repeat, a suspension,
-- money short, an empty rollback, a contradiction, two items of one
-- wallet, whose ledger rows each need the balance after the one before)
-- shows as a statement that changed fewer rows than the group has items:
-- the set attempt is rolled back whole and the group runs through its
-- `*_group` procedure (migrations/wallet/*_wallet_step_groups.sql), item
-- by item, which answers each item as it would alone. So each `*_set`
-- procedure answers exactly what its `*_group` procedure would.
--
-- The item list is read as a table (JSON_TABLE) joined to the rows by key
-- (ascii key columns, as the keys are; the list drives the joins, in the
-- order the caller sorted it, so rows are locked in that order:
-- STRAIGHT_JOIN and FORCE INDEX, as the optimizer would scan a small
-- table, locking every row).

-- What a Try and a message-mode debit share, for a group of items
-- `[tx_id, user_id, order_id, amount_cents, …]` inside the caller's
-- transaction: the fences (branch `p_branch`; phase `try` for a freeze,
-- `confirm` for a debit, which is final at once), the movement `p_kind`
-- (`freeze`, or `debit` from the balance) and its ledger rows. `p_taken`
-- is 1 when every item was fresh, of its own wallet and covered; else 0,
-- with some items written and not others: the caller rolls back.
CREATE PROCEDURE wallet_take_set(
    IN p_items LONGTEXT,
    IN p_branch VARCHAR(16) CHARACTER SET ascii,
    IN p_kind VARCHAR(16) CHARACTER SET ascii,
    OUT p_taken TINYINT
)
SQL SECURITY INVOKER
take: BEGIN
    DECLARE v_items INT DEFAULT JSON_LENGTH(p_items);
    DECLARE v_distinct INT;
    DECLARE v_freeze TINYINT DEFAULT p_kind = 'freeze';
    SET p_taken = 0;
    IF p_kind NOT IN ('freeze', 'debit') THEN
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'not a movement a group takes';
    END IF;
    SELECT LEAST(COUNT(DISTINCT tx_id), COUNT(DISTINCT user_id)) INTO v_distinct
        FROM JSON_TABLE(p_items, '$[*]' COLUMNS (
            tx_id VARCHAR(32) CHARACTER SET ascii PATH '$[0]',
            user_id BIGINT UNSIGNED PATH '$[1]'
        )) AS item;
    IF v_distinct <> v_items THEN
        LEAVE take;
    END IF;
    INSERT IGNORE INTO tcc_fences (tx_id, branch, phase, resource, amount_cents, order_id)
        SELECT tx_id, p_branch, IF(v_freeze, 'try', 'confirm'), user_id, amount_cents, order_id
        FROM JSON_TABLE(p_items, '$[*]' COLUMNS (
            tx_id VARCHAR(32) CHARACTER SET ascii PATH '$[0]',
            user_id BIGINT UNSIGNED PATH '$[1]',
            order_id VARCHAR(36) CHARACTER SET ascii PATH '$[2]',
            amount_cents BIGINT PATH '$[3]'
        )) AS item;
    IF ROW_COUNT() <> v_items THEN
        LEAVE take;
    END IF;
    UPDATE JSON_TABLE(p_items, '$[*]' COLUMNS (
            user_id BIGINT UNSIGNED PATH '$[1]',
            amount_cents BIGINT PATH '$[3]'
        )) AS item
        STRAIGHT_JOIN wallets FORCE INDEX (PRIMARY) ON wallets.user_id = item.user_id
        SET wallets.balance_cents = wallets.balance_cents - item.amount_cents,
            wallets.frozen_cents = wallets.frozen_cents + IF(v_freeze, item.amount_cents, 0)
        WHERE item.amount_cents > 0 AND wallets.balance_cents >= item.amount_cents;
    IF ROW_COUNT() <> v_items THEN
        LEAVE take;
    END IF;
    INSERT INTO wallet_ledger
        (user_id, kind, amount_cents, balance_after, frozen_after, order_id, tx_id)
        SELECT wallets.user_id, p_kind, item.amount_cents, wallets.balance_cents,
               wallets.frozen_cents, item.order_id, item.tx_id
        FROM JSON_TABLE(p_items, '$[*]' COLUMNS (
            tx_id VARCHAR(32) CHARACTER SET ascii PATH '$[0]',
            user_id BIGINT UNSIGNED PATH '$[1]',
            order_id VARCHAR(36) CHARACTER SET ascii PATH '$[2]',
            amount_cents BIGINT PATH '$[3]'
        )) AS item
        STRAIGHT_JOIN wallets FORCE INDEX (PRIMARY) ON wallets.user_id = item.user_id;
    SET p_taken = 1;
END;

-- Try, items and outcomes as wallet_try_group: all `frozen`, or its answer.
CREATE PROCEDURE wallet_try_set(IN p_items LONGTEXT)
SQL SECURITY INVOKER
BEGIN
    DECLARE v_taken TINYINT;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
    CALL wallet_take_set(p_items, 'wallet', 'freeze', v_taken);
    IF v_taken THEN
        COMMIT;
        SELECT CONCAT('[', REPEAT('"frozen",', JSON_LENGTH(p_items) - 1), '"frozen"]') AS outcomes;
    ELSE
        ROLLBACK;
        CALL wallet_try_group(p_items);
    END IF;
END;

-- Confirm (the frozen amount is the order's debit) or Cancel (it goes back
-- to the balance), items and outcomes as wallet_end_group: all `done`, or
-- its answer. Only fences that kept their order take this way (older ones
-- look it up in the ledger, item by item).
CREATE PROCEDURE wallet_end_set(IN p_items LONGTEXT)
SQL SECURITY INVOKER
set_based: BEGIN
    DECLARE v_items INT DEFAULT JSON_LENGTH(p_items);
    DECLARE v_distinct INT;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    SELECT COUNT(DISTINCT tx_id) INTO v_distinct
        FROM JSON_TABLE(p_items, '$[*]' COLUMNS (
            tx_id VARCHAR(32) CHARACTER SET ascii PATH '$[0]'
        )) AS item;
    IF v_distinct = v_items THEN
        START TRANSACTION;
        UPDATE JSON_TABLE(p_items, '$[*]' COLUMNS (
                tx_id VARCHAR(32) CHARACTER SET ascii PATH '$[0]',
                phase VARCHAR(8) CHARACTER SET ascii PATH '$[1]'
            )) AS item
            STRAIGHT_JOIN tcc_fences FORCE INDEX (PRIMARY) ON tcc_fences.tx_id = item.tx_id AND tcc_fences.branch = 'wallet'
            SET tcc_fences.phase = item.phase
            WHERE item.phase IN ('confirm', 'cancel') AND tcc_fences.phase = 'try'
              AND tcc_fences.order_id IS NOT NULL AND tcc_fences.resource REGEXP '^[0-9]+$';
        IF ROW_COUNT() = v_items THEN
            SELECT COUNT(DISTINCT tcc_fences.resource) INTO v_distinct
                FROM JSON_TABLE(p_items, '$[*]' COLUMNS (
                    tx_id VARCHAR(32) CHARACTER SET ascii PATH '$[0]'
                )) AS item
                STRAIGHT_JOIN tcc_fences FORCE INDEX (PRIMARY) ON tcc_fences.tx_id = item.tx_id AND tcc_fences.branch = 'wallet';
        ELSE
            SET v_distinct = 0;
        END IF;
        IF v_distinct = v_items THEN
            UPDATE JSON_TABLE(p_items, '$[*]' COLUMNS (
                    tx_id VARCHAR(32) CHARACTER SET ascii PATH '$[0]',
                    phase VARCHAR(8) CHARACTER SET ascii PATH '$[1]'
                )) AS item
                STRAIGHT_JOIN tcc_fences FORCE INDEX (PRIMARY) ON tcc_fences.tx_id = item.tx_id AND tcc_fences.branch = 'wallet'
                STRAIGHT_JOIN wallets FORCE INDEX (PRIMARY) ON wallets.user_id = CAST(tcc_fences.resource AS UNSIGNED)
                SET wallets.frozen_cents = wallets.frozen_cents - tcc_fences.amount_cents,
                    wallets.balance_cents = wallets.balance_cents
                        + IF(item.phase = 'cancel', tcc_fences.amount_cents, 0)
                WHERE wallets.frozen_cents >= tcc_fences.amount_cents;
            IF ROW_COUNT() = v_items THEN
                INSERT INTO wallet_ledger
                    (user_id, kind, amount_cents, balance_after, frozen_after, order_id, tx_id)
                    SELECT wallets.user_id, IF(item.phase = 'confirm', 'debit', 'unfreeze'),
                           tcc_fences.amount_cents, wallets.balance_cents, wallets.frozen_cents,
                           tcc_fences.order_id, item.tx_id
                    FROM JSON_TABLE(p_items, '$[*]' COLUMNS (
                        tx_id VARCHAR(32) CHARACTER SET ascii PATH '$[0]',
                        phase VARCHAR(8) CHARACTER SET ascii PATH '$[1]'
                    )) AS item
                    STRAIGHT_JOIN tcc_fences FORCE INDEX (PRIMARY) ON tcc_fences.tx_id = item.tx_id
                        AND tcc_fences.branch = 'wallet'
                    STRAIGHT_JOIN wallets FORCE INDEX (PRIMARY) ON wallets.user_id = CAST(tcc_fences.resource AS UNSIGNED);
                COMMIT;
                SELECT CONCAT('[', REPEAT('"done",', v_items - 1), '"done"]') AS outcomes;
                LEAVE set_based;
            END IF;
        END IF;
        ROLLBACK;
    END IF;
    CALL wallet_end_group(p_items);
END;

-- The message mode's debit, items and outcomes as wallet_debit_group: all
-- `debited` (each the fence confirmed, the debit with its ledger row and
-- the "debited" message in the outbox), or its answer.
CREATE PROCEDURE wallet_debit_set(IN p_items LONGTEXT)
SQL SECURITY INVOKER
BEGIN
    DECLARE v_taken TINYINT;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
    CALL wallet_take_set(p_items, 'message', 'debit', v_taken);
    IF v_taken THEN
        INSERT INTO outbox (message_id, payload)
            SELECT message_id, payload FROM JSON_TABLE(p_items, '$[*]' COLUMNS (
                message_id VARCHAR(32) CHARACTER SET ascii PATH '$[4]',
                payload LONGTEXT PATH '$[5]'
            )) AS item;
        COMMIT;
        SELECT CONCAT('[', REPEAT('"debited",', JSON_LENGTH(p_items) - 1), '"debited"]')
            AS outcomes;
    ELSE
        ROLLBACK;
        CALL wallet_debit_group(p_items);
    END IF;
END;
