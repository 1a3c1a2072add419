-- Paying an order across two databases (this one and the wallet's): the
-- order's own side of every payment mode.
--
-- `paying`: a payment holds the order (TCC tried it, or the message mode
-- waits for the wallet's debit). Neither the buyer's cancel nor the
-- timeout closer touches it: both are guarded on `unpaid`. Every payment
-- transaction ends it, as `paid` or back to `unpaid`.
ALTER TABLE orders
    MODIFY COLUMN status ENUM('unpaid', 'paying', 'paid', 'closed') NOT NULL DEFAULT 'unpaid';

-- The coordinator's log, one row per payment attempt, in every mode. The
-- state only moves forward (started -> committing | aborting -> committed
-- | aborted), each step a guarded UPDATE, so a pay call and the recovery
-- loop racing on one transaction agree on its outcome.
CREATE TABLE pay_transactions (
    tx_id        CHAR(32)        CHARACTER SET ascii NOT NULL,
    order_id     CHAR(36)        CHARACTER SET ascii NOT NULL,
    user_id      BIGINT UNSIGNED NOT NULL,
    amount_cents BIGINT          NOT NULL,
    mode         ENUM('tcc', 'xa', 'message') NOT NULL,
    state        ENUM('started', 'committing', 'aborting', 'committed', 'aborted') NOT NULL,
    -- Why an aborted transaction aborted (insufficient_funds, order_closed,
    -- wallet_unavailable, timeout ...), for the buyer's answer and ops.
    reason       VARCHAR(64)     NULL,
    created_at   DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at   DATETIME(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (tx_id),
    KEY idx_pay_tx_order (order_id),
    -- recovery: open transactions, oldest first
    KEY idx_pay_tx_state_updated (state, updated_at),
    CONSTRAINT ck_pay_tx_amount CHECK (amount_cents >= 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- The order branch's TCC fence: one row per (transaction, branch), holding
-- the phase the branch reached. A Cancel that finds no row records an empty
-- rollback; a Try that finds a Cancel is refused (suspension); a repeated
-- Confirm or Cancel finds its own phase and does nothing. The wallet's
-- database has the same table for its branch.
CREATE TABLE tcc_fences (
    tx_id          CHAR(32)     CHARACTER SET ascii NOT NULL,
    branch         VARCHAR(16)  CHARACTER SET ascii NOT NULL,
    phase          ENUM('try', 'confirm', 'cancel') NOT NULL,
    -- A Cancel that arrived before (or instead of) its Try.
    empty_rollback TINYINT(1)   NOT NULL DEFAULT 0,
    -- What the Try held, so Confirm and Cancel act on exactly that.
    resource       VARCHAR(64)  CHARACTER SET ascii NOT NULL DEFAULT '',
    amount_cents   BIGINT       NOT NULL DEFAULT 0,
    created_at     DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at     DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (tx_id, branch),
    -- audit: branches still at `try`
    KEY idx_tcc_fences_phase_updated (phase, updated_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
