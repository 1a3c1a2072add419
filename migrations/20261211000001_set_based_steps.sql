-- The order branch's TCC steps and the coordinator's log moves as set
-- statements: a group whose every item is the plain case (the Try holds a
-- fresh order, the Confirm or Cancel applies a held one, the log moves
-- from the state expected) runs as a few statements for the whole group
-- instead of a loop of about eight per item (each a statement the server
-- opens tables for and runs; the loops were most of what a payment cost
-- the database). Anything else in the group (a repeat, a refusal, an
-- empty rollback, a contradiction, two items on one row) shows as a
-- statement that changed fewer rows than the group has items: the set
-- attempt is rolled back whole and the group runs through its `*_group`
-- procedure (migrations/*_order_step_groups.sql, *_log_move_group.sql),
-- item by item, which answers each item as it would alone. So each `*_set`
-- procedure answers exactly what its `*_group` procedure would.
--
-- The item list is read as a table (JSON_TABLE) joined to the rows by key:
-- its key columns are ascii, the key columns' character set, or the join
-- would scan the table. The list comes sorted by the row each item locks
-- first (workers/src/group_commit.rs) and drives the joins by primary key
-- (STRAIGHT_JOIN, FORCE INDEX: on a small table the optimizer would rather
-- scan it, locking every row), so rows are locked in that order.

-- Try, items and outcomes as order_try_group: all `held`, or its answer.
CREATE PROCEDURE order_try_set(
    IN p_items LONGTEXT,
    IN p_refused_reason VARCHAR(64) CHARACTER SET ascii
)
SQL SECURITY INVOKER
set_based: BEGIN
    DECLARE v_items INT DEFAULT JSON_LENGTH(p_items);
    DECLARE v_distinct INT;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    SELECT LEAST(COUNT(DISTINCT tx_id), COUNT(DISTINCT order_id)) INTO v_distinct
        FROM JSON_TABLE(p_items, '$[*]' COLUMNS (
            tx_id VARCHAR(32) CHARACTER SET ascii PATH '$[0]',
            order_id VARCHAR(36) CHARACTER SET ascii PATH '$[2]'
        )) AS item;
    IF v_distinct = v_items THEN
        START TRANSACTION;
        INSERT INTO pay_transactions (tx_id, order_id, user_id, amount_cents, mode, state)
            SELECT tx_id, order_id, user_id, amount_cents, mode, 'started'
            FROM JSON_TABLE(p_items, '$[*]' COLUMNS (
                tx_id VARCHAR(32) CHARACTER SET ascii PATH '$[0]',
                user_id BIGINT UNSIGNED PATH '$[1]',
                order_id VARCHAR(36) CHARACTER SET ascii PATH '$[2]',
                log TINYINT PATH '$[3]',
                amount_cents BIGINT PATH '$[4]',
                mode VARCHAR(8) CHARACTER SET ascii PATH '$[5]'
            )) AS item
            WHERE log = 1;
        INSERT IGNORE INTO tcc_fences (tx_id, branch, phase, resource, amount_cents, order_id)
            SELECT tx_id, 'order', 'try', order_id, 0, order_id
            FROM JSON_TABLE(p_items, '$[*]' COLUMNS (
                tx_id VARCHAR(32) CHARACTER SET ascii PATH '$[0]',
                order_id VARCHAR(36) CHARACTER SET ascii PATH '$[2]'
            )) AS item;
        IF ROW_COUNT() = v_items THEN
            UPDATE JSON_TABLE(p_items, '$[*]' COLUMNS (
                    user_id BIGINT UNSIGNED PATH '$[1]',
                    order_id VARCHAR(36) CHARACTER SET ascii PATH '$[2]'
                )) AS item
                STRAIGHT_JOIN orders FORCE INDEX (PRIMARY) ON orders.id = item.order_id AND orders.user_id = item.user_id
                SET orders.status = 'paying'
                WHERE orders.status = 'unpaid' AND orders.expires_at > NOW(3);
            IF ROW_COUNT() = v_items THEN
                COMMIT;
                SELECT CONCAT('[', REPEAT('"held",', v_items - 1), '"held"]') AS outcomes;
                LEAVE set_based;
            END IF;
        END IF;
        ROLLBACK;
    END IF;
    CALL order_try_group(p_items, p_refused_reason);
END;

-- Confirm or Cancel, items and outcomes as order_end_group: all `done`, or
-- its answer.
CREATE PROCEDURE order_end_set(IN p_items LONGTEXT)
SQL SECURITY INVOKER
set_based: BEGIN
    DECLARE v_items INT DEFAULT JSON_LENGTH(p_items);
    DECLARE v_distinct INT;
    DECLARE v_decisions INT;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    SELECT COUNT(DISTINCT tx_id), SUM(decide) INTO v_distinct, v_decisions
        FROM JSON_TABLE(p_items, '$[*]' COLUMNS (
            tx_id VARCHAR(32) CHARACTER SET ascii PATH '$[0]',
            decide TINYINT PATH '$[2]'
        )) AS item;
    IF v_distinct = v_items THEN
        START TRANSACTION;
        IF v_decisions > 0 THEN
            UPDATE JSON_TABLE(p_items, '$[*]' COLUMNS (
                    tx_id VARCHAR(32) CHARACTER SET ascii PATH '$[0]',
                    decide TINYINT PATH '$[2]'
                )) AS item
                STRAIGHT_JOIN pay_transactions FORCE INDEX (PRIMARY) ON pay_transactions.tx_id = item.tx_id
                SET pay_transactions.state = 'committing'
                WHERE item.decide = 1 AND pay_transactions.state = 'started';
        END IF;
        IF v_decisions = 0 OR ROW_COUNT() = v_decisions THEN
            UPDATE JSON_TABLE(p_items, '$[*]' COLUMNS (
                    tx_id VARCHAR(32) CHARACTER SET ascii PATH '$[0]',
                    phase VARCHAR(8) CHARACTER SET ascii PATH '$[1]'
                )) AS item
                STRAIGHT_JOIN tcc_fences FORCE INDEX (PRIMARY) ON tcc_fences.tx_id = item.tx_id AND tcc_fences.branch = 'order'
                STRAIGHT_JOIN orders FORCE INDEX (PRIMARY) ON orders.id = tcc_fences.resource
                SET tcc_fences.phase = item.phase,
                    orders.status = IF(item.phase = 'confirm', 'paid', 'unpaid'),
                    orders.paid_at = IF(item.phase = 'confirm', NOW(3), NULL)
                WHERE item.phase IN ('confirm', 'cancel') AND tcc_fences.phase = 'try'
                  AND orders.status = 'paying';
            -- Each item changes two rows: its fence and its order.
            IF ROW_COUNT() = 2 * v_items THEN
                COMMIT;
                SELECT CONCAT('[', REPEAT('"done",', v_items - 1), '"done"]') AS outcomes;
                LEAVE set_based;
            END IF;
        END IF;
        ROLLBACK;
    END IF;
    CALL order_end_group(p_items);
END;

-- The log moves, items and outcomes as log_move_group: all `moved`, or its
-- answer.
CREATE PROCEDURE log_move_set(IN p_items LONGTEXT)
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
                from_state VARCHAR(16) CHARACTER SET ascii PATH '$[1]',
                to_state VARCHAR(16) CHARACTER SET ascii PATH '$[2]',
                reason VARCHAR(64) CHARACTER SET ascii PATH '$[3]'
            )) AS item
            STRAIGHT_JOIN pay_transactions FORCE INDEX (PRIMARY) ON pay_transactions.tx_id = item.tx_id
            SET pay_transactions.state = item.to_state,
                pay_transactions.reason = COALESCE(NULLIF(item.reason, ''), pay_transactions.reason)
            WHERE pay_transactions.state = item.from_state;
        IF ROW_COUNT() = v_items THEN
            COMMIT;
            SELECT CONCAT('[', REPEAT('"moved",', v_items - 1), '"moved"]') AS outcomes;
            LEAVE set_based;
        END IF;
        ROLLBACK;
    END IF;
    CALL log_move_group(p_items);
END;

-- The message mode's settle, items and outcomes as order_settle_group: all
-- `paid` (each message recorded consumed, its order confirmed, its log
-- `committed`), or its answer.
CREATE PROCEDURE order_settle_set(IN p_items LONGTEXT)
SQL SECURITY INVOKER
set_based: BEGIN
    DECLARE v_items INT DEFAULT JSON_LENGTH(p_items);
    DECLARE v_distinct INT;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    SELECT LEAST(COUNT(DISTINCT tx_id), COUNT(DISTINCT message_id)) INTO v_distinct
        FROM JSON_TABLE(p_items, '$[*]' COLUMNS (
            tx_id VARCHAR(32) CHARACTER SET ascii PATH '$[0]',
            message_id VARCHAR(32) CHARACTER SET ascii PATH '$[1]'
        )) AS item;
    IF v_distinct = v_items THEN
        START TRANSACTION;
        INSERT IGNORE INTO consumed_messages (message_id)
            SELECT message_id FROM JSON_TABLE(p_items, '$[*]' COLUMNS (
                message_id VARCHAR(32) CHARACTER SET ascii PATH '$[1]'
            )) AS item;
        IF ROW_COUNT() = v_items THEN
            UPDATE JSON_TABLE(p_items, '$[*]' COLUMNS (
                    tx_id VARCHAR(32) CHARACTER SET ascii PATH '$[0]'
                )) AS item
                STRAIGHT_JOIN pay_transactions FORCE INDEX (PRIMARY)
                    ON pay_transactions.tx_id = item.tx_id
                STRAIGHT_JOIN tcc_fences FORCE INDEX (PRIMARY)
                    ON tcc_fences.tx_id = item.tx_id AND tcc_fences.branch = 'order'
                STRAIGHT_JOIN orders FORCE INDEX (PRIMARY) ON orders.id = tcc_fences.resource
                SET pay_transactions.state = 'committed',
                    tcc_fences.phase = 'confirm',
                    orders.status = 'paid',
                    orders.paid_at = NOW(3)
                WHERE pay_transactions.state IN ('started', 'committing')
                  AND tcc_fences.phase = 'try' AND orders.status = 'paying';
            -- Each item changes three rows: its log, its fence and its order.
            IF ROW_COUNT() = 3 * v_items THEN
                COMMIT;
                SELECT CONCAT('[', REPEAT('"paid",', v_items - 1), '"paid"]') AS outcomes;
                LEAVE set_based;
            END IF;
        END IF;
        ROLLBACK;
    END IF;
    CALL order_settle_group(p_items);
END;
