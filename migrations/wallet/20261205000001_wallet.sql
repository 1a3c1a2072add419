-- The wallet service's own database (`seckill_wallet`): nothing but the
-- wallet service reads or writes it. Money is integer cents.

CREATE TABLE wallets (
    user_id       BIGINT UNSIGNED NOT NULL,
    -- Spendable money. The database refuses a negative balance whatever a
    -- caller does: the last guard against spending money twice.
    balance_cents BIGINT          NOT NULL DEFAULT 0,
    -- Held by open TCC transactions (Try froze it; Confirm spends it,
    -- Cancel gives it back).
    frozen_cents  BIGINT          NOT NULL DEFAULT 0,
    updated_at    DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (user_id),
    CONSTRAINT ck_wallets_balance CHECK (balance_cents >= 0),
    CONSTRAINT ck_wallets_frozen CHECK (frozen_cents >= 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- One row for every movement of money, written in the transaction that
-- moves it, with the balances after it.
CREATE TABLE wallet_ledger (
    id            BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    user_id       BIGINT UNSIGNED NOT NULL,
    -- credit: a top-up; freeze / unfreeze: TCC Try / Cancel; debit: money
    -- spent on an order; refund: a debit given back.
    kind          ENUM('credit', 'freeze', 'unfreeze', 'debit', 'refund') NOT NULL,
    amount_cents  BIGINT          NOT NULL,
    balance_after BIGINT          NOT NULL,
    frozen_after  BIGINT          NOT NULL,
    order_id      CHAR(36)        CHARACTER SET ascii NULL,
    -- The payment transaction (or message) that moved it: one movement of
    -- each kind per transaction, whatever retries happen.
    tx_id         CHAR(32)        CHARACTER SET ascii NULL,
    created_at    DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    UNIQUE KEY uk_ledger_tx_kind (tx_id, kind),
    KEY idx_ledger_user (user_id, id),
    KEY idx_ledger_order (order_id),
    CONSTRAINT ck_ledger_amount CHECK (amount_cents > 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- The wallet branch's TCC fence (see the order database's tcc_fences).
CREATE TABLE tcc_fences (
    tx_id          CHAR(32)     CHARACTER SET ascii NOT NULL,
    branch         VARCHAR(16)  CHARACTER SET ascii NOT NULL,
    phase          ENUM('try', 'confirm', 'cancel') NOT NULL,
    empty_rollback TINYINT(1)   NOT NULL DEFAULT 0,
    resource       VARCHAR(64)  CHARACTER SET ascii NOT NULL DEFAULT '',
    amount_cents   BIGINT       NOT NULL DEFAULT 0,
    created_at     DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at     DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (tx_id, branch),
    KEY idx_tcc_fences_phase_updated (phase, updated_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
