//! Turns a batch of order messages into MySQL rows in one transaction.
//!
//! MySQL is the source of truth and the last line of defence: whatever Redis
//! admitted, this module alone guarantees that a sale never sells more than
//! its `stock_left` (invariant 1), that a buyer has at most one order per
//! sale (invariant 2) and that a message, however often it is delivered,
//! settles exactly once (an order, or a `failed_admissions` row).
//!
//! One batch, one transaction (READ COMMITTED, so every statement sees the
//! latest commits of other workers):
//!
//! 1. lock the batch's sales rows (`SELECT ... ORDER BY id FOR UPDATE`; one
//!    order of locking, so two workers never deadlock on each other). Every
//!    writer of orders for a sale holds that sale's row lock until it commits,
//!    so the checks below cannot race a concurrent worker;
//! 2. find messages already settled (an order or a failed admission with the
//!    same `request_id`): they are reported again, never written twice;
//! 3. find existing orders of the batch's (user, sale) pairs;
//! 4. decide, in message order: reservation released before the message
//!    arrived → `released`; unknown sale → `unknown_sale`; the buyer
//!    already has an order (earlier or in this batch) → `duplicate`; the sale
//!    has no stock left → `sold_out`; else a new order takes one unit;
//! 5. per sale one guarded decrement, `UPDATE sales SET stock_left =
//!    stock_left - n WHERE id = ? AND stock_left >= n` — the batched form of
//!    the per-order `stock_left > 0` guard: with the row locked it is
//!    equivalent, and a miss (0 rows) aborts the transaction;
//! 6. one multi-row `INSERT` of the orders (UNIQUE(user_id, sale_id) and
//!    UNIQUE(request_id) stay the final guards: a duplicate-key error aborts
//!    the whole transaction, which the consumer retries, and the retry then
//!    sees the conflicting row in step 2/3), and one multi-row `INSERT` of
//!    the failed admissions;
//! 7. `COMMIT`.
//!
//! Nothing is decremented for a failed admission, so nothing has to be
//! restored in MySQL.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Instant;

use chrono::{DateTime, Utc};
use seckill_contracts::OrderMessage;
use sqlx::{MySqlPool, QueryBuilder, Row};

use super::metrics::METRICS;

/// Why an admission did not become an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailReason {
    /// MySQL's stock guard refused: the sale has no stock left.
    SoldOut,
    /// No such sale in MySQL.
    UnknownSale,
    /// The buyer already has an order for this sale.
    Duplicate,
    /// The reservation was released before the message arrived (the
    /// gateway rolled back after a failed publish, or it timed out): the
    /// buyer was told no, and its unit is back in stock.
    Released,
}

impl FailReason {
    /// The value stored in `failed_admissions.reason` and shown to the buyer.
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::SoldOut => "sold_out",
            FailReason::UnknownSale => "unknown_sale",
            FailReason::Duplicate => "duplicate",
            FailReason::Released => "released",
        }
    }

    /// Reads a stored reason; anything unknown (written by a newer build)
    /// is reported as `sold_out`-like failure without a stock release.
    pub fn parse(s: &str) -> Option<FailReason> {
        match s {
            "sold_out" => Some(FailReason::SoldOut),
            "unknown_sale" => Some(FailReason::UnknownSale),
            "duplicate" => Some(FailReason::Duplicate),
            "released" => Some(FailReason::Released),
            _ => None,
        }
    }
}

/// How one message settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// An order exists for this request (new, or found on a redelivery).
    Success { order_id: String },
    /// An explicit failure. `reason` is the stored text; `existing_order`
    /// is the buyer's order for a `duplicate`.
    Failed {
        reason: String,
        existing_order: Option<String>,
    },
}

/// The outcome of one message of a batch, in batch order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub message: OrderMessage,
    pub settlement: Settlement,
    /// True when the message had been settled before this batch (a
    /// redelivery or a duplicate publish): nothing was written for it.
    pub already_settled: bool,
}

/// Why a batch transaction did not commit. The transaction is rolled back
/// (dropped) in every case, so nothing of the batch is visible.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("MySQL: {0}")]
    Database(#[from] sqlx::Error),
    /// The guarded decrement matched no row although the row was locked and
    /// checked; should be impossible, retried like a conflict.
    #[error("stock guard of sale {0} refused a checked decrement")]
    GuardMissed(u64),
    /// Claiming the batch's reservations in Redis failed (before any write).
    #[error("redis: {0}")]
    Redis(redis::RedisError),
}

impl WriteError {
    fn mysql_code(&self) -> u16 {
        match self {
            WriteError::Database(sqlx::Error::Database(db)) => db
                .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .map(|e| e.number())
                .unwrap_or(0),
            _ => 0,
        }
    }

    /// Errors that say nothing about the messages: the database is
    /// unreachable, shutting down or busy (deadlock, lock wait). They are
    /// retried without counting against the messages' delivery limit, so a
    /// MySQL outage never sends good orders to the DLQ.
    pub fn is_transient(&self) -> bool {
        match self {
            WriteError::GuardMissed(_) => false,
            WriteError::Redis(_) => true,
            WriteError::Database(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Protocol(_) => true,
                // 1213 deadlock, 1205 lock wait timeout, 2006/2013 server
                // gone / lost connection, 1927 connection killed, 1053
                // server shutdown, 1040 too many connections.
                sqlx::Error::Database(_) => {
                    matches!(
                        self.mysql_code(),
                        1213 | 1205 | 2006 | 2013 | 1927 | 1053 | 1040
                    )
                }
                _ => false,
            },
        }
    }

    /// A lost race with another writer that an immediate retry resolves (a
    /// duplicate key the retry's checks will see, a guard miss). Retried in
    /// process; if it persists it is treated like any other failure and
    /// counted, so it can never loop forever.
    pub fn is_race(&self) -> bool {
        matches!(self, WriteError::GuardMissed(_)) || self.mysql_code() == 1062
    }
}

/// Settings the writer needs.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// An unpaid order closes this long after it is created.
    pub order_timeout_secs: u64,
}

struct SaleRow {
    goods_id: u64,
    price_cents: i64,
    stock_left: u32,
}

struct NewOrder<'a> {
    id: String,
    msg: &'a OrderMessage,
    goods_id: u64,
    amount_cents: i64,
}

/// Writes `messages` in one transaction and returns one [`Outcome`] per
/// message, in order. Messages with the same `message_id` (a duplicate
/// publish inside one batch) share one outcome. Messages whose id is in
/// `released` (see [`super::reservations::claim`]) settle as
/// [`FailReason::Released`] unless they were settled before.
pub async fn write_batch(
    db: &MySqlPool,
    messages: &[OrderMessage],
    released: &HashSet<String>,
    config: WriterConfig,
) -> Result<Vec<Outcome>, WriteError> {
    if messages.is_empty() {
        return Ok(Vec::new());
    }
    let started = Instant::now();
    let now: DateTime<Utc> = Utc::now();
    let expires_at = now
        + chrono::Duration::seconds(i64::try_from(config.order_timeout_secs).unwrap_or(i64::MAX));

    // First occurrence of every message id, in order.
    let mut seen = HashMap::new();
    let mut unique: Vec<&OrderMessage> = Vec::new();
    for m in messages {
        if !seen.contains_key(m.message_id.as_str()) {
            seen.insert(m.message_id.as_str(), unique.len());
            unique.push(m);
        }
    }
    let sale_ids: BTreeSet<u64> = unique.iter().map(|m| m.sale_id).collect();
    let user_ids: BTreeSet<u64> = unique.iter().map(|m| m.user_id).collect();

    let mut conn = db.acquire().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .execute(&mut *conn)
        .await?;
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;

    // 1. lock the sales, ascending id.
    let mut q = QueryBuilder::new(
        "SELECT id, goods_id, sale_price_cents, stock_left FROM sales WHERE id IN (",
    );
    push_list(&mut q, sale_ids.iter().copied());
    q.push(") ORDER BY id FOR UPDATE");
    let mut sales: HashMap<u64, SaleRow> = HashMap::new();
    for row in q.build().fetch_all(&mut *tx).await? {
        sales.insert(
            row.try_get("id")?,
            SaleRow {
                goods_id: row.try_get("goods_id")?,
                price_cents: row.try_get("sale_price_cents")?,
                stock_left: row.try_get("stock_left")?,
            },
        );
    }

    // 2. already settled requests.
    let mut q = QueryBuilder::new("SELECT request_id, id FROM orders WHERE request_id IN (");
    push_list(&mut q, unique.iter().map(|m| m.message_id.as_str()));
    q.push(")");
    let mut done_orders: HashMap<String, String> = HashMap::new();
    for row in q.build().fetch_all(&mut *tx).await? {
        done_orders.insert(row.try_get("request_id")?, row.try_get("id")?);
    }
    let mut q =
        QueryBuilder::new("SELECT request_id, reason FROM failed_admissions WHERE request_id IN (");
    push_list(&mut q, unique.iter().map(|m| m.message_id.as_str()));
    q.push(")");
    let mut done_failed: HashMap<String, String> = HashMap::new();
    for row in q.build().fetch_all(&mut *tx).await? {
        done_failed.insert(row.try_get("request_id")?, row.try_get("reason")?);
    }

    // 3. existing orders of the batch's buyers in the batch's sales.
    let mut q = QueryBuilder::new("SELECT user_id, sale_id, id FROM orders WHERE user_id IN (");
    push_list(&mut q, user_ids.iter().copied());
    q.push(") AND sale_id IN (");
    push_list(&mut q, sale_ids.iter().copied());
    q.push(")");
    let mut holders: HashMap<(u64, u64), String> = HashMap::new();
    for row in q.build().fetch_all(&mut *tx).await? {
        let user: u64 = row.try_get("user_id")?;
        let sale: u64 = row.try_get("sale_id")?;
        holders.insert((user, sale), row.try_get("id")?);
    }

    // 4. decide, in order.
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(unique.len());
    let mut new_orders: Vec<NewOrder<'_>> = Vec::new();
    let mut new_failed: Vec<(&OrderMessage, FailReason)> = Vec::new();
    let mut taken: HashMap<u64, u32> = HashMap::new();
    for m in &unique {
        let key = (m.user_id, m.sale_id);
        let (settlement, already) = if let Some(order_id) = done_orders.get(&m.message_id) {
            (
                Settlement::Success {
                    order_id: order_id.clone(),
                },
                true,
            )
        } else if let Some(reason) = done_failed.get(&m.message_id) {
            (
                Settlement::Failed {
                    reason: reason.clone(),
                    existing_order: holders.get(&key).cloned(),
                },
                true,
            )
        } else {
            let reason = match sales.get_mut(&m.sale_id) {
                _ if released.contains(&m.message_id) => Some(FailReason::Released),
                None => Some(FailReason::UnknownSale),
                Some(_) if holders.contains_key(&key) => Some(FailReason::Duplicate),
                Some(sale) if sale.stock_left == 0 => Some(FailReason::SoldOut),
                Some(sale) => {
                    sale.stock_left -= 1;
                    *taken.entry(m.sale_id).or_default() += 1;
                    let id = uuid::Uuid::now_v7().to_string();
                    holders.insert(key, id.clone());
                    new_orders.push(NewOrder {
                        id,
                        msg: m,
                        goods_id: sale.goods_id,
                        amount_cents: sale.price_cents,
                    });
                    None
                }
            };
            match reason {
                None => (
                    Settlement::Success {
                        order_id: holders[&key].clone(),
                    },
                    false,
                ),
                Some(reason) => {
                    new_failed.push((m, reason));
                    (
                        Settlement::Failed {
                            reason: reason.as_str().to_string(),
                            existing_order: if reason == FailReason::Duplicate {
                                holders.get(&key).cloned()
                            } else {
                                None
                            },
                        },
                        false,
                    )
                }
            }
        };
        outcomes.push(Outcome {
            message: (*m).clone(),
            settlement,
            already_settled: already,
        });
    }

    // 5. one guarded decrement per sale.
    for (&sale_id, &n) in &taken {
        let done = sqlx::query(
            "UPDATE sales SET stock_left = stock_left - ? WHERE id = ? AND stock_left >= ?",
        )
        .bind(n)
        .bind(sale_id)
        .bind(n)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(WriteError::GuardMissed(sale_id));
        }
    }

    // 6. the rows.
    if !new_orders.is_empty() {
        let mut q = QueryBuilder::new(
            "INSERT INTO orders (id, request_id, user_id, sale_id, goods_id, amount_cents, \
             status, created_at, expires_at) ",
        );
        q.push_values(&new_orders, |mut b, o| {
            b.push_bind(&o.id)
                .push_bind(&o.msg.message_id)
                .push_bind(o.msg.user_id)
                .push_bind(o.msg.sale_id)
                .push_bind(o.goods_id)
                .push_bind(o.amount_cents)
                .push_bind("unpaid")
                .push_bind(now)
                .push_bind(expires_at);
        });
        q.build().execute(&mut *tx).await?;
    }
    if !new_failed.is_empty() {
        let mut q = QueryBuilder::new(
            "INSERT INTO failed_admissions (request_id, user_id, sale_id, reason, created_at) ",
        );
        q.push_values(&new_failed, |mut b, (m, reason)| {
            b.push_bind(&m.message_id)
                .push_bind(m.user_id)
                .push_bind(m.sale_id)
                .push_bind(reason.as_str())
                .push_bind(now);
        });
        // A concurrent worker may have recorded the same request (unknown
        // sale: no row lock to serialise on); its row says the same thing.
        q.push(" ON DUPLICATE KEY UPDATE request_id = request_id");
        q.build().execute(&mut *tx).await?;
    }

    tx.commit().await?;
    METRICS
        .commit_seconds
        .observe(started.elapsed().as_secs_f64());
    METRICS.batch_size.observe(messages.len() as f64);
    METRICS.orders_committed.inc_by(new_orders.len() as u64);
    for (_, reason) in &new_failed {
        METRICS.failed.with_label_values(&[reason.as_str()]).inc();
    }

    // Expand back to one outcome per input message.
    Ok(messages
        .iter()
        .map(|m| {
            let idx = seen[m.message_id.as_str()];
            let mut o = outcomes[idx].clone();
            if !std::ptr::eq(m, unique[idx]) {
                // A second copy of the same request inside this batch.
                o.already_settled = true;
            }
            o.message = m.clone();
            o
        })
        .collect())
}

fn push_list<'a, T>(q: &mut QueryBuilder<'a, sqlx::MySql>, items: impl Iterator<Item = T>)
where
    T: 'a + sqlx::Encode<'a, sqlx::MySql> + sqlx::Type<sqlx::MySql>,
{
    let mut sep = q.separated(", ");
    for item in items {
        sep.push_bind(item);
    }
}
