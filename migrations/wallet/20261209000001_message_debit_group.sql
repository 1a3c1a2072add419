-- Group commit of the message mode's debit, as the TCC steps have it
-- (20261208000001_wallet_step_groups.sql): the debits of several payments,
-- collected while one group is in the database, run as one local
-- transaction in one round trip, so a burst of payments pays one commit per
-- group instead of one per debit and no round trip per statement. Each item
-- is the debit it was on its own, behind its own savepoint: the fence
-- (branch `message`), the movement, the "debited" message in the outbox and
-- the fence's confirmed phase, or nothing at all when the balance does not
-- cover the amount. Any error rolls the whole group back and reaches the
-- caller, who runs it again. Items are taken in the order given, which the
-- caller sorts by the wallet row each locks. The answer is one row: a JSON
-- array of outcomes, one per item, in the same order.

-- Per item `[tx_id, user_id, order_id, amount_cents, message_id, payload]`:
-- `debited`, `repeat` (debited by an earlier call), `cancelled` (the api's
-- check-back cancelled it first) or `insufficient_funds` (nothing kept, not
-- even the fence row).
CREATE PROCEDURE wallet_debit_group(IN p_items LONGTEXT)
SQL SECURITY INVOKER
BEGIN
    DECLARE v_left INT DEFAULT JSON_LENGTH(p_items);
    DECLARE v_outcomes LONGTEXT DEFAULT '[]';
    DECLARE v_tx_id CHAR(32) CHARACTER SET ascii;
    DECLARE v_user_id BIGINT UNSIGNED;
    DECLARE v_order_id CHAR(36) CHARACTER SET ascii;
    DECLARE v_amount_cents BIGINT;
    DECLARE v_message_id CHAR(32) CHARACTER SET ascii;
    DECLARE v_payload TEXT CHARACTER SET utf8mb4;
    DECLARE v_start VARCHAR(32) CHARACTER SET ascii;
    DECLARE v_moved TINYINT;
    DECLARE items CURSOR FOR
        SELECT * FROM JSON_TABLE(p_items, '$[*]' COLUMNS (
            tx_id VARCHAR(32) PATH '$[0]',
            user_id BIGINT UNSIGNED PATH '$[1]',
            order_id VARCHAR(36) PATH '$[2]',
            amount_cents BIGINT PATH '$[3]',
            message_id VARCHAR(32) PATH '$[4]',
            payload LONGTEXT PATH '$[5]'
        )) AS item;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
    OPEN items;
    -- Exactly as many fetches as items: a NOT FOUND handler here would also
    -- catch a called procedure's empty SELECT … INTO and end the loop.
    WHILE v_left > 0 DO
        FETCH items INTO v_tx_id, v_user_id, v_order_id, v_amount_cents, v_message_id,
                         v_payload;
        SET v_left = v_left - 1;
        SET v_moved = 0;
        SAVEPOINT item;
        CALL fence_try(v_tx_id, 'message', v_user_id, v_amount_cents, v_order_id, v_start);
        IF v_start = 'fresh' THEN
            CALL wallet_move(v_user_id, 'debit', v_amount_cents, 0, v_order_id, v_tx_id,
                             v_moved);
            IF v_moved = 1 THEN
                INSERT INTO outbox (message_id, payload) VALUES (v_message_id, v_payload);
                CALL fence_finish(v_tx_id, 'message', 'confirm');
                SET v_start = 'debited';
            ELSE
                ROLLBACK TO SAVEPOINT item;
                SET v_start = 'insufficient_funds';
            END IF;
        ELSEIF v_start = 'suspended' THEN
            SET v_start = 'cancelled';
        END IF;
        SET v_outcomes = JSON_ARRAY_APPEND(v_outcomes, '$', v_start);
    END WHILE;
    CLOSE items;
    COMMIT;
    SELECT v_outcomes AS outcomes;
END;
