-- Group commit of the message mode's settle (workers/src/payments/message.rs),
-- as the TCC steps and the wallet's debit have it: the debited messages the
-- api's consumer holds at once settle as one local transaction in one round
-- trip, so a burst of payments pays one commit per group instead of one
-- transaction of seven statements per message. Each item is the settle it
-- was on its own, behind its own savepoint: the log's row, the record that
-- the message was consumed, the order's Confirm (order_end_in) and the log
-- `committed`. Like the TCC Confirm it leaves the sale's row alone: a
-- `paying` order is no closer's to take, so no lock order needs it, and a
-- group holding it would stall the sale's order writer meanwhile. Any error rolls the whole group back and reaches the
-- caller, who runs it again; the message is acked only after. Items are
-- taken in the order given (the caller sorts them by transaction). The
-- answer is one row: a JSON array of outcomes, one per item, in order.

-- The settle called order_end_in through this, one statement at a time.
DROP PROCEDURE order_end_in_row;

-- Per item `[tx_id, message_id]`:
-- `paid`, `duplicate` (this message, or this transaction, was settled
-- before), `unknown` (no such transaction here; nothing kept),
-- `given_up` (the payment was given up first: nothing kept, the caller
-- sends the refund) or `inconsistent: …` (nothing kept).
CREATE PROCEDURE order_settle_group(IN p_items LONGTEXT)
SQL SECURITY INVOKER
BEGIN
    DECLARE v_left INT DEFAULT JSON_LENGTH(p_items);
    DECLARE v_outcomes LONGTEXT DEFAULT '[]';
    DECLARE v_tx_id CHAR(32) CHARACTER SET ascii;
    DECLARE v_message_id CHAR(32) CHARACTER SET ascii;
    DECLARE v_state VARCHAR(16) CHARACTER SET ascii;
    DECLARE v_outcome VARCHAR(255) CHARACTER SET utf8mb4;
    DECLARE items CURSOR FOR
        SELECT * FROM JSON_TABLE(p_items, '$[*]' COLUMNS (
            tx_id VARCHAR(32) PATH '$[0]',
            message_id VARCHAR(32) PATH '$[1]'
        )) AS item;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
    OPEN items;
    -- Exactly as many fetches as items: a NOT FOUND handler here would also
    -- catch a called procedure's empty SELECT … INTO and end the loop.
    WHILE v_left > 0 DO
        FETCH items INTO v_tx_id, v_message_id;
        SET v_left = v_left - 1;
        SET v_outcome = NULL;
        SAVEPOINT item;
        SET v_state = NULL;
        SELECT CAST(state AS CHAR) INTO v_state FROM pay_transactions
            WHERE tx_id = v_tx_id FOR UPDATE;
        IF v_state IS NULL THEN
            SET v_outcome = 'unknown';
        ELSE
            INSERT IGNORE INTO consumed_messages (message_id) VALUES (v_message_id);
            IF ROW_COUNT() = 0 THEN
                SET v_outcome = 'duplicate';
            ELSEIF v_state IN ('started', 'committing') THEN
                step: BEGIN
                    DECLARE EXIT HANDLER FOR SQLSTATE '45000' BEGIN
                        GET DIAGNOSTICS CONDITION 1 v_outcome = MESSAGE_TEXT;
                    END;
                    CALL order_end_in(v_tx_id, 'confirm', v_outcome);
                END step;
                IF v_outcome IN ('done', 'repeat') THEN
                    UPDATE pay_transactions SET state = 'committed' WHERE tx_id = v_tx_id;
                    SET v_outcome = 'paid';
                ELSE
                    ROLLBACK TO SAVEPOINT item;
                    IF v_outcome NOT LIKE 'inconsistent:%' THEN
                        SET v_outcome = CONCAT('inconsistent: the order branch answered ',
                                               v_outcome, ' to a debit');
                    END IF;
                END IF;
            ELSEIF v_state = 'committed' THEN
                SET v_outcome = 'duplicate';
            ELSE
                ROLLBACK TO SAVEPOINT item;
                SET v_outcome = 'given_up';
            END IF;
        END IF;
        SET v_outcomes = JSON_ARRAY_APPEND(v_outcomes, '$', v_outcome);
    END WHILE;
    CLOSE items;
    COMMIT;
    SELECT v_outcomes AS outcomes;
END;
