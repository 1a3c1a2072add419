-- payment.mode = message: the wallet's debited messages, written in the
-- local transaction of the debit itself, published by a relay with a
-- publisher confirm (see the order database's outbox).
CREATE TABLE outbox (
    id           BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    message_id   CHAR(32)        CHARACTER SET ascii NOT NULL,
    payload      TEXT            NOT NULL,
    created_at   DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    published_at DATETIME(3)     NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uk_outbox_message (message_id),
    KEY idx_outbox_pending (published_at, id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
