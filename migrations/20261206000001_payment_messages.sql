-- The order side of payment.mode = message.
--
-- consumed_messages: every payment message the api has acted on, written
-- in the same local transaction as its effect, so a redelivered message
-- (the broker re-sends what was not acked) does nothing twice.
CREATE TABLE consumed_messages (
    message_id  CHAR(32)    CHARACTER SET ascii NOT NULL,
    consumed_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (message_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Messages this database owes the broker (the compensating refunds),
-- written in the local transaction that decides them; a relay publishes
-- each with a publisher confirm, then marks it. The wallet's database has
-- the same table for its debited messages.
CREATE TABLE outbox (
    id           BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    message_id   CHAR(32)        CHARACTER SET ascii NOT NULL,
    payload      TEXT            NOT NULL,
    created_at   DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    published_at DATETIME(3)     NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uk_outbox_message (message_id),
    -- the relay: unpublished rows, oldest first
    KEY idx_outbox_pending (published_at, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
