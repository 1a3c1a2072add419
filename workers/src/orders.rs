//! The order lifecycle after admission: `unpaid` → `paid` | `closed`
//! (SPEC §3), and the stock a closed order gives back. Paying goes
//! through `payments`, which holds the order (`paying`) while the wallet
//! side is settled; nothing here closes a `paying` order.
//!
//! ```text
//!            payments (the order branch: guarded, unpaid, not expired)
//!   unpaid ──────────▶ paying ──────────▶ paid
//!     │  ◀──────────── (cancelled payment)
//!     │ cancel (the buyer) / timeout (closer, sweeper)
//!     ▼
//!   closed ──▶ MySQL: sales.stock_left + 1        (same transaction)
//!          ──▶ Redis: return_stock.lua, once per order (returned set)
//!          ──▶ orders.stock_returned_at = now      (the return is finished)
//!          ──▶ sale event `reopened` when the counter left 0
//! ```
//!
//! Every transition is one guarded `UPDATE ... WHERE status = 'unpaid'`, so
//! a payment racing a close (the buyer pays in the last millisecond while
//! the timeout fires) ends with exactly one of them: the row lock orders
//! the two statements and the second finds the guard false. Pay also
//! requires `expires_at > NOW(3)` and a timeout close `expires_at <= NOW(3)`,
//! so the two never both apply at the same instant either.
//!
//! Every transition takes the sale's row lock before the order's (a close
//! exclusively, a payment step shared), the same order as the order writer
//! (`worker::order_writer`): InnoDB share-locks the sale row inside any
//! status change anyway (the foreign key's index holds `status`), so any
//! other order would deadlock. A transition still picked as a deadlock
//! victim is retried; its guard makes that safe.
//! The Redis half of a close runs after the commit and can be cut short by
//! a crash; `stock_returned_at` stays NULL then, and
//! [`finish_stock_returns`] (run by the sweeper) completes it. The returned
//! set makes the Redis step idempotent, so finishing twice never adds two
//! units. A closed order keeps its buyer marker: a buyer has at most one
//! order per sale whatever its status (SPEC invariant 2).

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use redis::aio::ConnectionLike;
use seckill_contracts::keys::KeySchema;
use seckill_contracts::sale_events::{self, SaleEvent, SaleEventKind};
use serde::Serialize;
use sqlx::mysql::MySqlRow;
use sqlx::{MySqlPool, Row};

use crate::group_commit::{self, GroupCommit, GroupLimits};
use crate::statuses::{CloseReason, OrderStatus, UnknownValue};

/// The script that gives a closed order's unit back to Redis.
pub const RETURN_STOCK_SCRIPT: &str = include_str!("../../lua/workers/return_stock.lua");
static RETURN_STOCK: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(RETURN_STOCK_SCRIPT));
/// Most orders `GET /orders` lists, newest first.
pub const LIST_LIMIT: u32 = 100;
/// A closed order whose Redis return is this old and unfinished is left to
/// the sweeper; younger ones are probably being finished by their closer.
const RETURN_GRACE_SECS: u32 = 5;

/// Why an order operation failed. Nothing is half-done in MySQL: every
/// change is one transaction; a Redis failure after the commit is finished
/// later by [`finish_stock_returns`].
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("MySQL: {0}")]
    Db(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A row holds a value this build does not know (a newer build wrote
    /// it, or someone edited it): refused rather than guessed.
    #[error("order row: {0}")]
    Stored(#[from] UnknownValue),
}

/// An order as its buyer sees it (the JSON of the orders routes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Order {
    #[schema(format = Uuid)]
    pub id: String,
    pub sale_id: u64,
    pub goods_id: u64,
    /// What the buyer pays, in cents.
    pub amount_cents: i64,
    pub status: OrderStatus,
    /// Why a closed order closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close_reason: Option<CloseReason>,
    pub created_at: DateTime<Utc>,
    /// When an unpaid order closes by itself.
    pub expires_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paid_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<DateTime<Utc>>,
}

const ORDER_COLUMNS: &str = "id, sale_id, goods_id, amount_cents, status, close_reason, \
                             created_at, expires_at, paid_at, closed_at";

impl Order {
    fn from_row(row: &MySqlRow) -> Result<Order, OrderError> {
        let status: String = row.try_get("status")?;
        let status = status.parse::<OrderStatus>()?;
        let reason: Option<String> = row.try_get("close_reason")?;
        let close_reason = reason.map(|r| r.parse::<CloseReason>()).transpose()?;
        Ok(Order {
            id: row.try_get("id")?,
            sale_id: row.try_get("sale_id")?,
            goods_id: row.try_get("goods_id")?,
            amount_cents: row.try_get("amount_cents")?,
            status,
            close_reason,
            created_at: row.try_get("created_at")?,
            expires_at: row.try_get("expires_at")?,
            paid_at: row.try_get("paid_at")?,
            closed_at: row.try_get("closed_at")?,
        })
    }
}

/// True for the only shape an order id has (a hyphenated UUID: hex digits
/// and dashes); anything else is answered as "not found" without a query.
/// The XA branches write a checked id into their statements' text.
pub fn valid_order_id(id: &str) -> bool {
    id.len() == 36
        && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        && uuid::Uuid::parse_str(id).is_ok()
}

/// The buyer's orders, newest first (at most [`LIST_LIMIT`]).
pub async fn list_for_user(db: &MySqlPool, user_id: u64) -> Result<Vec<Order>, OrderError> {
    let sql = format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE user_id = ? \
         ORDER BY created_at DESC, id DESC LIMIT ?"
    );
    let rows = sqlx::query(&sql)
        .bind(user_id)
        .bind(LIST_LIMIT)
        .fetch_all(db)
        .await?;
    rows.iter().map(Order::from_row).collect()
}

/// The order `order_id` if it is `user_id`'s; `None` for an unknown id,
/// a malformed one, or someone else's (the caller answers 404 to all
/// three, so nobody learns which ids exist).
pub async fn get_for_user(
    db: &MySqlPool,
    user_id: u64,
    order_id: &str,
) -> Result<Option<Order>, OrderError> {
    if !valid_order_id(order_id) {
        return Ok(None);
    }
    let sql = format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = ? AND user_id = ?");
    let row = sqlx::query(&sql)
        .bind(order_id)
        .bind(user_id)
        .fetch_optional(db)
        .await?;
    row.as_ref().map(Order::from_row).transpose()
}

/// [`get_for_user`] for many callers at once: a paying buyer's order is
/// read before and after the payment, and under a burst those reads share
/// one `SELECT … WHERE id IN (…)` per group ([`crate::group_commit`]).
pub struct OrderReads(GroupCommit<OrderOf, Option<Order>, OrderError>);

/// One read: (order id, its buyer).
type OrderOf = (String, u64);

impl OrderReads {
    /// Starts the runners on the current runtime.
    pub fn start(db: &MySqlPool, limits: GroupLimits) -> OrderReads {
        OrderReads(GroupCommit::start(
            limits,
            group_commit::on_pool(db, read_many),
        ))
    }

    /// See [`get_for_user`].
    pub async fn get_for_user(
        &self,
        user_id: u64,
        order_id: &str,
    ) -> Result<Option<Order>, OrderError> {
        if !valid_order_id(order_id) {
            return Ok(None);
        }
        self.0.run((order_id.to_string(), user_id)).await
    }
}

async fn read_many(
    db: MySqlPool,
    items: Vec<OrderOf>,
) -> Result<Vec<Result<Option<Order>, OrderError>>, OrderError> {
    let sql = format!(
        "SELECT {ORDER_COLUMNS}, user_id FROM orders WHERE id IN ({})",
        vec!["?"; items.len()].join(", ")
    );
    let mut query = sqlx::query(&sql);
    for (order_id, _) in &items {
        query = query.bind(order_id);
    }
    let rows = query.fetch_all(&db).await?;
    let mut found = Vec::with_capacity(rows.len());
    for row in &rows {
        let user_id: u64 = row.try_get("user_id")?;
        found.push((Order::from_row(row)?, user_id));
    }
    Ok(items
        .iter()
        .map(|(order_id, user_id)| {
            Ok(found
                .iter()
                .find(|(o, owner)| &o.id == order_id && owner == user_id)
                .map(|(o, _)| o.clone()))
        })
        .collect())
}

/// What a cancel found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Closed now, stock returned.
    Cancelled(Order),
    /// Closed before (cancelled or timed out): nothing changed.
    AlreadyClosed(Order),
    /// Paid orders cannot be cancelled here: 409.
    Paid(Order),
    /// A payment holds it: 409 until the payment ends.
    Paying(Order),
    /// No such order of this buyer.
    NotFound,
}

/// Cancels the buyer's unpaid order and gives its unit back.
pub async fn cancel<C: ConnectionLike>(
    db: &MySqlPool,
    redis: &mut C,
    keys: &KeySchema,
    user_id: u64,
    order_id: &str,
) -> Result<CancelOutcome, OrderError> {
    let Some(order) = get_for_user(db, user_id, order_id).await? else {
        return Ok(CancelOutcome::NotFound);
    };
    let closed = close(
        db,
        redis,
        keys,
        &order.id,
        order.sale_id,
        CloseReason::Cancelled,
    )
    .await?;
    let Some(order) = get_for_user(db, user_id, order_id).await? else {
        return Ok(CancelOutcome::NotFound);
    };
    Ok(match order.status {
        OrderStatus::Closed if closed.closed() => CancelOutcome::Cancelled(order),
        OrderStatus::Closed => CancelOutcome::AlreadyClosed(order),
        OrderStatus::Paid => CancelOutcome::Paid(order),
        OrderStatus::Paying => CancelOutcome::Paying(order),
        // Unreachable in practice (the guarded close either closed it or
        // found it paid or closed); report the order as it is.
        OrderStatus::Unpaid => CancelOutcome::AlreadyClosed(order),
    })
}

/// What became of the Redis half of a close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StockReturn {
    /// The unit went back; the counter now reads this.
    Returned(i64),
    /// It had gone back before (a retry, or a reconcile counted it).
    AlreadyReturned,
    /// The sale's counter is missing (Redis lost it): the reconciler
    /// rebuilds it from MySQL, where the unit is already back.
    NoCounter,
    /// Redis failed; [`finish_stock_returns`] will finish it.
    Failed,
}

/// What one close attempt did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseOutcome {
    /// This call closed the order (MySQL committed) and tried the Redis
    /// return.
    Closed { sale_id: u64, stock: StockReturn },
    /// Nothing to do: unknown, paid, closed already, or (timeout) not due.
    Unchanged,
}

impl CloseOutcome {
    /// True when this call changed the order.
    pub fn closed(&self) -> bool {
        matches!(self, CloseOutcome::Closed { .. })
    }
}

/// Closes `order_id` for timeout if it is still unpaid and past
/// `expires_at` (the closer's delayed message, the sweeper, a late pay).
pub async fn close_expired_one<C: ConnectionLike>(
    db: &MySqlPool,
    redis: &mut C,
    keys: &KeySchema,
    order_id: &str,
) -> Result<CloseOutcome, OrderError> {
    if !valid_order_id(order_id) {
        return Ok(CloseOutcome::Unchanged);
    }
    let sale: Option<u64> = sqlx::query_scalar("SELECT sale_id FROM orders WHERE id = ?")
        .bind(order_id)
        .fetch_optional(db)
        .await?;
    match sale {
        Some(sale_id) => close(db, redis, keys, order_id, sale_id, CloseReason::Timeout).await,
        None => Ok(CloseOutcome::Unchanged),
    }
}

/// Closes up to `limit` overdue unpaid orders (oldest deadline first) and
/// returns how many this call closed. The sweeper's safety net for close
/// messages that were never scheduled or got lost.
pub async fn close_expired<C: ConnectionLike>(
    db: &MySqlPool,
    redis: &mut C,
    keys: &KeySchema,
    limit: u32,
) -> Result<u64, OrderError> {
    let due: Vec<(String, u64)> = sqlx::query_as(
        "SELECT id, sale_id FROM orders WHERE status = ? AND expires_at <= NOW(3) \
         ORDER BY expires_at LIMIT ?",
    )
    .bind(OrderStatus::Unpaid)
    .bind(limit)
    .fetch_all(db)
    .await?;
    let mut closed = 0;
    for (order_id, sale_id) in due {
        if close(db, redis, keys, &order_id, sale_id, CloseReason::Timeout)
            .await?
            .closed()
        {
            closed += 1;
        }
    }
    Ok(closed)
}

/// Finishes up to `limit` stock returns that a crash (or a Redis error)
/// cut short after the close committed. Returns how many it finished.
/// Sales whose counter is missing are left to the reconciler.
pub async fn finish_stock_returns<C: ConnectionLike>(
    db: &MySqlPool,
    redis: &mut C,
    keys: &KeySchema,
    limit: u32,
) -> Result<u64, OrderError> {
    let pending: Vec<(String, u64)> = sqlx::query_as(
        "SELECT id, sale_id FROM orders \
         WHERE status = ? AND stock_returned_at IS NULL \
           AND closed_at < NOW(3) - INTERVAL ? SECOND \
         ORDER BY closed_at LIMIT ?",
    )
    .bind(OrderStatus::Closed)
    .bind(RETURN_GRACE_SECS)
    .bind(limit)
    .fetch_all(db)
    .await?;
    let mut finished = 0;
    for (order_id, sale_id) in pending {
        match return_stock(db, redis, keys, &order_id, sale_id).await {
            StockReturn::Returned(_) | StockReturn::AlreadyReturned => finished += 1,
            StockReturn::NoCounter | StockReturn::Failed => {}
        }
    }
    Ok(finished)
}

/// The close itself: one MySQL transaction (sale row lock, guarded order
/// update, stock_left + 1), then the Redis return.
async fn close<C: ConnectionLike>(
    db: &MySqlPool,
    redis: &mut C,
    keys: &KeySchema,
    order_id: &str,
    sale_id: u64,
    reason: CloseReason,
) -> Result<CloseOutcome, OrderError> {
    if !retry_on_deadlock(|| close_in_mysql(db, order_id, sale_id, reason)).await? {
        return Ok(CloseOutcome::Unchanged);
    }
    tracing::info!(order_id, sale_id, %reason, "order closed");
    let stock = return_stock(db, redis, keys, order_id, sale_id).await;
    Ok(CloseOutcome::Closed { sale_id, stock })
}

/// The MySQL half of a close, one transaction: true when this call closed
/// the order and gave its unit back to `stock_left`.
async fn close_in_mysql(
    db: &MySqlPool,
    order_id: &str,
    sale_id: u64,
    reason: CloseReason,
) -> Result<bool, sqlx::Error> {
    let mut tx = db.begin().await?;
    // Sale row first, as the order writer does: no lock-order cycle.
    sqlx::query("SELECT id FROM sales WHERE id = ? FOR UPDATE")
        .bind(sale_id)
        .execute(&mut *tx)
        .await?;
    let due = match reason {
        CloseReason::Timeout => " AND expires_at <= NOW(3)",
        CloseReason::Cancelled => "",
    };
    let sql = format!(
        "UPDATE orders SET status = ?, close_reason = ?, closed_at = NOW(3) \
         WHERE id = ? AND sale_id = ? AND status = ?{due}"
    );
    let changed = sqlx::query(&sql)
        .bind(OrderStatus::Closed)
        .bind(reason)
        .bind(order_id)
        .bind(sale_id)
        .bind(OrderStatus::Unpaid)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if changed != 1 {
        tx.rollback().await?;
        return Ok(false);
    }
    sqlx::query(
        "UPDATE sales SET stock_left = stock_left + 1 \
         WHERE id = ? AND stock_left < stock_total",
    )
    .bind(sale_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Attempts of a transition InnoDB chose as a deadlock victim.
const DEADLOCK_ATTEMPTS: u32 = 3;

/// Runs `op` again when InnoDB rolled it back as a deadlock victim. Safe
/// because every transition is guarded: a retry that finds the order
/// already moved changes nothing. The lock order above makes deadlocks
/// rare; this covers the ones other writers of the sale row can still cause.
pub(crate) async fn retry_on_deadlock<T, E, F, Fut>(mut op: F) -> Result<T, E>
where
    E: MaybeDeadlock,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if attempt < DEADLOCK_ATTEMPTS && e.is_deadlock() => {
                tracing::debug!(attempt, "deadlock victim; retrying the transition");
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(5 * u64::from(attempt))).await;
            }
            other => return other,
        }
    }
}

/// An error that may be InnoDB breaking a deadlock (SQLSTATE 40001).
pub(crate) trait MaybeDeadlock {
    fn is_deadlock(&self) -> bool;
}

impl MaybeDeadlock for sqlx::Error {
    fn is_deadlock(&self) -> bool {
        self.as_database_error()
            .and_then(|d| d.code())
            .is_some_and(|code| code == "40001")
    }
}

/// The Redis half of a close, then `stock_returned_at`. Never fails: a
/// failure is logged and left for [`finish_stock_returns`].
async fn return_stock<C: ConnectionLike>(
    db: &MySqlPool,
    redis: &mut C,
    keys: &KeySchema,
    order_id: &str,
    sale_id: u64,
) -> StockReturn {
    let sale = keys.sale(sale_id);
    let result: Result<i64, _> = RETURN_STOCK
        .key(sale.stock())
        .key(sale.returned())
        .arg(order_id)
        .invoke_async(redis)
        .await;
    let outcome = match result {
        Ok(-1) => return StockReturn::NoCounter,
        Ok(0) => StockReturn::AlreadyReturned,
        Ok(n) => StockReturn::Returned(n),
        Err(e) => {
            tracing::warn!(order_id, sale_id, error = %e, "returning stock to Redis failed; the sweeper finishes it");
            return StockReturn::Failed;
        }
    };
    if outcome == StockReturn::Returned(1) {
        // The counter left 0: every gateway drops its sold-out mark.
        let event = SaleEvent {
            sale_id,
            kind: SaleEventKind::Reopened,
        };
        if let Err(e) = sale_events::publish(redis, keys, event).await {
            tracing::warn!(sale_id, error = %e, "could not announce the reopened sale");
        }
    }
    if let Err(e) = sqlx::query(
        "UPDATE orders SET stock_returned_at = NOW(3) WHERE id = ? AND stock_returned_at IS NULL",
    )
    .bind(order_id)
    .execute(db)
    .await
    {
        // The returned set already holds the order: a later finish is a
        // no-op in Redis and only sets this column.
        tracing::warn!(order_id, error = %e, "recording the stock return failed");
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_uuids_are_order_ids() {
        assert!(valid_order_id("0192f0c4-6a3b-7c2e-9d1f-0123456789ab"));
        assert!(!valid_order_id(""));
        assert!(!valid_order_id("1 OR 1=1"));
        assert!(!valid_order_id("0192f0c4-6a3b-7c2e-9d1f-0123456789ab'--"));
        assert!(!valid_order_id("0192f0c46a3b7c2e9d1f0123456789ab"));
    }

    #[test]
    fn order_json_is_snake_case_and_skips_empty_times() {
        let t = DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let o = Order {
            id: "0192f0c4-6a3b-7c2e-9d1f-0123456789ab".into(),
            sale_id: 1,
            goods_id: 2,
            amount_cents: 990,
            status: OrderStatus::Closed,
            close_reason: Some(CloseReason::Timeout),
            created_at: t,
            expires_at: t,
            paid_at: None,
            closed_at: Some(t),
        };
        let v = serde_json::to_value(&o).unwrap();
        assert_eq!(v["status"], "closed");
        assert_eq!(v["close_reason"], "timeout");
        assert_eq!(v["created_at"], "2026-11-24T10:00:00Z");
        assert!(v.get("paid_at").is_none());
    }
}
