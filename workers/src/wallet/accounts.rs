//! Balances and their ledger: every movement of money is one guarded
//! update of the buyer's wallet row plus one ledger row, in the caller's
//! transaction, so a balance and its history can never disagree.
//!
//! ```text
//!   credit    balance + x                      (a top-up; creates the row)
//!   freeze    balance - x, frozen + x          (TCC Try)
//!   unfreeze  balance + x, frozen - x          (TCC Cancel)
//!   debit     frozen - x  (TCC Confirm) | balance - x (XA, message)
//!   refund    balance + x                      (a debit given back)
//! ```
//!
//! The guard is in the `WHERE` clause (the result may not go negative),
//! and the database's `CHECK`s back it up: a movement the wallet cannot
//! afford changes nothing and says so.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{MySqlConnection, MySqlPool, Row};

use crate::statuses::{LedgerKind, UnknownValue};

/// Ledger rows `GET /wallet` shows, newest first.
pub const STATEMENT_ROWS: u32 = 100;

/// Why a wallet operation failed (as opposed to what it decided).
#[derive(Debug, thiserror::Error)]
pub enum WalletError {
    #[error("MySQL: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored value: {0}")]
    Stored(#[from] UnknownValue),
    #[error(transparent)]
    Fence(#[from] crate::payments::fence::FenceError),
    #[error("XA: {0}")]
    Xa(String),
    /// A movement the fence says is due found the money not there: the
    /// database disagrees with its own fence. Never expected; refused
    /// loudly rather than papered over.
    #[error("{0}")]
    Inconsistent(String),
}

/// A wallet step InnoDB chose as a deadlock victim rolled back whole:
/// safe to run again (its fence makes a repeat harmless anyway).
impl crate::orders::MaybeDeadlock for WalletError {
    fn is_deadlock(&self) -> bool {
        match self {
            WalletError::Db(e) | WalletError::Fence(crate::payments::fence::FenceError::Db(e)) => {
                e.is_deadlock()
            }
            _ => false,
        }
    }
}

/// Whether `e` is MySQL refusing a duplicate key (1062): the ledger's
/// one movement of each kind per transaction, already there.
pub(crate) fn is_duplicate_key(e: &sqlx::Error) -> bool {
    const ER_DUP_ENTRY: u16 = 1062;
    e.as_database_error()
        .and_then(|d| d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
        .is_some_and(|m| m.number() == ER_DUP_ENTRY)
}

/// One movement of money.
#[derive(Debug, Clone)]
pub struct Movement<'a> {
    pub user_id: u64,
    pub kind: LedgerKind,
    pub amount_cents: i64,
    pub order_id: Option<&'a str>,
    pub tx_id: Option<&'a str>,
}

/// Applies `m` in `conn`'s transaction; `false` (nothing written) when
/// the wallet lacks the money. A debit of frozen money is a TCC Confirm.
/// The movement is the database's `wallet_move` procedure (what each kind
/// does to the balance and the frozen money, the guard, the ledger row
/// with the balances after it), which the TCC steps call too: one owner,
/// one round trip.
pub async fn apply(
    conn: &mut MySqlConnection,
    m: &Movement<'_>,
    from_frozen: bool,
) -> Result<bool, WalletError> {
    let moved: Option<i8> = sqlx::query_scalar("CALL wallet_move_row(?, ?, ?, ?, ?, ?)")
        .bind(m.user_id)
        .bind(m.kind)
        .bind(m.amount_cents)
        .bind(from_frozen)
        .bind(m.order_id)
        .bind(m.tx_id)
        .fetch_one(&mut *conn)
        .await?;
    Ok(moved == Some(1))
}

/// A top-up of `amount_cents` (> 0) for `user_id`, in its own transaction.
pub async fn credit(
    db: &MySqlPool,
    user_id: u64,
    amount_cents: i64,
) -> Result<Wallet, WalletError> {
    let mut tx = db.begin().await?;
    let movement = Movement {
        user_id,
        kind: LedgerKind::Credit,
        amount_cents,
        order_id: None,
        tx_id: None,
    };
    apply(&mut tx, &movement, false).await?;
    tx.commit().await?;
    statement(db, user_id).await
}

/// One ledger row as its owner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct LedgerEntry {
    pub id: u64,
    pub kind: LedgerKind,
    pub amount_cents: i64,
    pub balance_after_cents: i64,
    pub frozen_after_cents: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = Uuid)]
    pub order_id: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A wallet as its owner sees it (`GET /api/v1/wallet`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Wallet {
    /// Spendable money, in cents.
    pub balance_cents: i64,
    /// Money held by payments in progress, in cents.
    pub frozen_cents: i64,
    /// The latest movements, newest first (at most 100).
    pub ledger: Vec<LedgerEntry>,
}

/// `user_id`'s wallet: zeros and no ledger for a user who never had money.
pub async fn statement(db: &MySqlPool, user_id: u64) -> Result<Wallet, WalletError> {
    let balances: Option<(i64, i64)> =
        sqlx::query_as("SELECT balance_cents, frozen_cents FROM wallets WHERE user_id = ?")
            .bind(user_id)
            .fetch_optional(db)
            .await?;
    let (balance_cents, frozen_cents) = balances.unwrap_or((0, 0));
    let rows = sqlx::query(
        "SELECT id, kind, amount_cents, balance_after, frozen_after, order_id, created_at \
         FROM wallet_ledger WHERE user_id = ? ORDER BY id DESC LIMIT ?",
    )
    .bind(user_id)
    .bind(STATEMENT_ROWS)
    .fetch_all(db)
    .await?;
    let mut ledger = Vec::with_capacity(rows.len());
    for row in rows {
        let kind: String = row.try_get("kind")?;
        ledger.push(LedgerEntry {
            id: row.try_get("id")?,
            kind: kind.parse()?,
            amount_cents: row.try_get("amount_cents")?,
            balance_after_cents: row.try_get("balance_after")?,
            frozen_after_cents: row.try_get("frozen_after")?,
            order_id: row.try_get("order_id")?,
            created_at: row.try_get("created_at")?,
        });
    }
    Ok(Wallet {
        balance_cents,
        frozen_cents,
        ledger,
    })
}

/// The wallet side of `seckillctl audit --payments`: money held, money
/// put in, and what each order's debits and refunds add up to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct WalletFigures {
    pub balances_cents: i64,
    pub frozen_cents: i64,
    /// Every top-up ever made.
    pub credited_cents: i64,
    /// Per order with any debit or refund: (order id, debits, refunds,
    /// debited cents - refunded cents).
    pub orders: Vec<OrderMoney>,
    /// TCC branches still at `try` for longer than the audit's threshold.
    pub open_fences: i64,
    /// Transaction ids of prepared XA wallet branches on the wallet's
    /// database server (any deployment's: the coordinator keeps its own).
    #[serde(default)]
    pub prepared_xa: Vec<String>,
    /// Debited messages not yet published (`message` mode).
    #[serde(default)]
    pub outbox_pending: i64,
}

/// What one order's ledger rows add up to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct OrderMoney {
    pub order_id: String,
    pub debits: i64,
    pub refunds: i64,
    pub net_cents: i64,
}

/// Reads [`WalletFigures`]; `open_after_ms` is how old a `try` must be to
/// count as open.
pub async fn figures(db: &MySqlPool, open_after_ms: u64) -> Result<WalletFigures, WalletError> {
    let (balances_cents, frozen_cents): (i64, i64) = sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(balance_cents), 0) AS SIGNED), \
                CAST(COALESCE(SUM(frozen_cents), 0) AS SIGNED) FROM wallets",
    )
    .fetch_one(db)
    .await?;
    let credited_cents: i64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS SIGNED) FROM wallet_ledger WHERE kind = ?",
    )
    .bind(LedgerKind::Credit)
    .fetch_one(db)
    .await?;
    let orders: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT order_id, \
                CAST(SUM(kind = ?) AS SIGNED), CAST(SUM(kind = ?) AS SIGNED), \
                CAST(SUM(CASE kind WHEN ? THEN amount_cents WHEN ? THEN -amount_cents \
                              ELSE 0 END) AS SIGNED) \
         FROM wallet_ledger WHERE order_id IS NOT NULL AND kind IN (?, ?) \
         GROUP BY order_id",
    )
    .bind(LedgerKind::Debit)
    .bind(LedgerKind::Refund)
    .bind(LedgerKind::Debit)
    .bind(LedgerKind::Refund)
    .bind(LedgerKind::Debit)
    .bind(LedgerKind::Refund)
    .fetch_all(db)
    .await?;
    let mut conn = db.acquire().await?;
    let open_fences = crate::payments::fence::open_branches(&mut conn, open_after_ms).await?;
    Ok(WalletFigures {
        balances_cents,
        frozen_cents,
        credited_cents,
        orders: orders
            .into_iter()
            .map(|(order_id, debits, refunds, net_cents)| OrderMoney {
                order_id,
                debits,
                refunds,
                net_cents,
            })
            .collect(),
        open_fences,
        prepared_xa: Vec::new(),
        outbox_pending: 0,
    })
}
