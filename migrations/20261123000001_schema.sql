-- The source of truth. Redis and RabbitMQ only ever hold copies or messages
-- that end up here; every guard that must hold even if Redis is wrong is a
-- constraint or a guarded UPDATE against these tables.

CREATE TABLE users (
    id            BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    username      VARCHAR(64)  NOT NULL,
    -- argon2id PHC string
    password_hash VARCHAR(255) NOT NULL,
    created_at    DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    UNIQUE KEY uk_users_username (username)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE goods (
    id          BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    title       VARCHAR(200) NOT NULL,
    price_cents BIGINT       NOT NULL,
    created_at  DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    CONSTRAINT ck_goods_price CHECK (price_cents >= 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE sales (
    id               BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    goods_id         BIGINT UNSIGNED NOT NULL,
    sale_price_cents BIGINT       NOT NULL,
    stock_total      INT UNSIGNED NOT NULL,
    -- Decremented by the order writer with a `stock_left > 0` guard and
    -- returned when an order closes, so MySQL alone can never oversell.
    stock_left       INT UNSIGNED NOT NULL,
    starts_at        DATETIME(3)  NOT NULL,
    ends_at          DATETIME(3)  NOT NULL,
    created_at       DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at       DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    KEY idx_sales_window (starts_at, ends_at),
    CONSTRAINT fk_sales_goods FOREIGN KEY (goods_id) REFERENCES goods (id),
    CONSTRAINT ck_sales_stock CHECK (stock_left <= stock_total),
    CONSTRAINT ck_sales_window CHECK (ends_at > starts_at),
    CONSTRAINT ck_sales_price CHECK (sale_price_cents >= 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE orders (
    -- UUIDv7: time-ordered for index locality, not guessable from another id.
    id           CHAR(36)        CHARACTER SET ascii NOT NULL,
    -- The admission's request id (the AMQP message id): a redelivered
    -- message finds its order by it.
    request_id   VARCHAR(64)     CHARACTER SET ascii NOT NULL,
    user_id      BIGINT UNSIGNED NOT NULL,
    sale_id      BIGINT UNSIGNED NOT NULL,
    goods_id     BIGINT UNSIGNED NOT NULL,
    amount_cents BIGINT          NOT NULL,
    status       ENUM('unpaid', 'paid', 'closed') NOT NULL DEFAULT 'unpaid',
    close_reason ENUM('cancelled', 'timeout') NULL,
    created_at   DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    -- When an unpaid order closes by itself.
    expires_at   DATETIME(3)     NOT NULL,
    paid_at      DATETIME(3)     NULL,
    closed_at    DATETIME(3)     NULL,
    PRIMARY KEY (id),
    -- The final duplicate guard: one order per buyer and sale, whatever its status.
    UNIQUE KEY uk_orders_user_sale (user_id, sale_id),
    UNIQUE KEY uk_orders_request (request_id),
    -- "my orders", newest first
    KEY idx_orders_user_created (user_id, created_at),
    -- the timeout sweeper: unpaid orders past expires_at
    KEY idx_orders_status_expires (status, expires_at),
    -- audit: unclosed orders of one sale
    KEY idx_orders_sale_status (sale_id, status),
    CONSTRAINT fk_orders_sale FOREIGN KEY (sale_id) REFERENCES sales (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Admissions that could not become an order (guard failure, released
-- reservation, unknown sale). Recording them makes a redelivery of the same
-- message a no-op and gives result polling its explicit `failed`.
CREATE TABLE failed_admissions (
    request_id VARCHAR(64)     CHARACTER SET ascii NOT NULL,
    user_id    BIGINT UNSIGNED NOT NULL,
    sale_id    BIGINT UNSIGNED NOT NULL,
    reason     VARCHAR(64)     NOT NULL,
    created_at DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (request_id),
    KEY idx_failed_sale_user (sale_id, user_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
