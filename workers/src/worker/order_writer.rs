//! Turns a batch of order messages into MySQL rows in one transaction.
//!
//! MySQL is the source of truth and the last line of defence: whatever Redis
//! admitted, this module alone guarantees that a sale never sells more than
//! its `stock_left` (invariant 1), that a buyer has at most one order per
//! sale (invariant 2) and that a message, however often it is delivered,
//! settles exactly once (an order, or a `failed_admissions` row).
//!
//! One batch, one transaction (READ COMMITTED, so every statement sees the
//! latest commits of other workers), in three parts: the reads
//! ([`read_state`], steps 1–3) give a [`DbState`]; the pure [`decide`]
//! (step 4) turns the batch and that state into a [`Plan`]; the apply
//! (steps 5–7) writes the plan.
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
//! 6. one multi-row `INSERT` of the orders, `created_at` and `expires_at` on
//!    MySQL's clock (`NOW(3)`), the one the pay and close guards compare
//!    with, so no worker's clock drift can make an order due early or late
//!    (UNIQUE(user_id, sale_id) and
//!    UNIQUE(request_id) stay the final guards: a duplicate-key error aborts
//!    the whole transaction, which the consumer retries, and the retry then
//!    sees the conflicting row in step 2/3), and one multi-row `INSERT` of
//!    the failed admissions;
//! 7. `COMMIT`.
//!
//! Nothing is decremented for a failed admission, so nothing has to be
//! restored in MySQL.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Instant;

use seckill_contracts::OrderMessage;
use sqlx::mysql::MySqlConnection;
use sqlx::{MySqlPool, QueryBuilder, Row};

use super::metrics::METRICS;
use crate::statuses::{FailReason, OrderStatus, UnknownValue};

/// How one message settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// An order exists for this request (new, or found on a redelivery).
    Success { order_id: String },
    /// An explicit failure; `existing_order` is the buyer's order for a
    /// `duplicate`.
    Failed {
        reason: FailReason,
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
    /// A stored row holds a value this build does not know.
    #[error("stored row: {0}")]
    Stored(#[from] UnknownValue),
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
            WriteError::GuardMissed(_) | WriteError::Stored(_) => false,
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

/// A sale row as the batch found it (locked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleRow {
    pub goods_id: u64,
    pub price_cents: i64,
    pub stock_left: u32,
}

/// What MySQL holds about a batch, read under its sales' row locks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DbState {
    /// The batch's sales that exist.
    pub sales: HashMap<u64, SaleRow>,
    /// Request id → order id: requests that already became an order.
    pub settled_orders: HashMap<String, String>,
    /// Request id → reason: requests already refused.
    pub settled_failures: HashMap<String, FailReason>,
    /// (user, sale) → order id, for the batch's buyers in its sales.
    pub holders: HashMap<(u64, u64), String>,
}

/// One order row to insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder<'a> {
    pub id: String,
    pub message: &'a OrderMessage,
    pub goods_id: u64,
    pub amount_cents: i64,
}

/// What the transaction writes, and what each message settles as.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan<'a> {
    /// One per distinct message, in batch order.
    pub outcomes: Vec<Outcome>,
    pub new_orders: Vec<NewOrder<'a>>,
    pub new_failures: Vec<(&'a OrderMessage, FailReason)>,
    /// Units taken per sale: one guarded decrement each.
    pub taken: BTreeMap<u64, u32>,
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
    let batch = Distinct::of(messages);
    let mut conn = db.acquire().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .execute(&mut *conn)
        .await?;
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let state = read_state(&mut tx, &batch.unique).await?;
    let plan = decide(&batch.unique, state, released, || {
        uuid::Uuid::now_v7().to_string()
    });
    apply(&mut tx, &plan, config).await?;
    tx.commit().await?;
    METRICS
        .commit_seconds
        .observe(started.elapsed().as_secs_f64());
    METRICS.batch_size.observe(messages.len() as f64);
    METRICS
        .orders_committed
        .inc_by(plan.new_orders.len() as u64);
    let now_ms = seckill_contracts::clock::unix_ms() as i64;
    for order in &plan.new_orders {
        let waited_ms = now_ms.saturating_sub(order.message.admitted_at_ms).max(0);
        METRICS
            .end_to_end_seconds
            .observe(waited_ms as f64 / 1000.0);
    }
    for (_, reason) in &plan.new_failures {
        METRICS.failed.with_label_values(&[reason.as_str()]).inc();
    }
    Ok(batch.expand(messages, &plan.outcomes))
}

/// The distinct messages of a batch: the first copy of every message id,
/// in order.
struct Distinct<'a> {
    unique: Vec<&'a OrderMessage>,
    index: HashMap<&'a str, usize>,
}

impl<'a> Distinct<'a> {
    fn of(messages: &'a [OrderMessage]) -> Distinct<'a> {
        let mut index = HashMap::new();
        let mut unique = Vec::new();
        for m in messages {
            index.entry(m.message_id.as_str()).or_insert_with(|| {
                unique.push(m);
                unique.len() - 1
            });
        }
        Distinct { unique, index }
    }

    /// One outcome per message of `messages` (the batch these were taken
    /// from): a later copy of a message id gets its first copy's outcome,
    /// marked as settled before.
    fn expand(&self, messages: &[OrderMessage], outcomes: &[Outcome]) -> Vec<Outcome> {
        messages
            .iter()
            .filter_map(|m| {
                let idx = *self.index.get(m.message_id.as_str())?;
                let mut o = outcomes.get(idx)?.clone();
                if !std::ptr::eq(m, self.unique[idx]) {
                    o.already_settled = true;
                }
                o.message = m.clone();
                Some(o)
            })
            .collect()
    }
}

/// Steps 1–3: locks the batch's sales (ascending id) and reads what is
/// already settled and who already holds an order.
pub async fn read_state(
    conn: &mut MySqlConnection,
    messages: &[&OrderMessage],
) -> Result<DbState, WriteError> {
    let sale_ids: BTreeSet<u64> = messages.iter().map(|m| m.sale_id).collect();
    let user_ids: BTreeSet<u64> = messages.iter().map(|m| m.user_id).collect();
    let request_ids = || messages.iter().map(|m| m.message_id.as_str());
    Ok(DbState {
        sales: lock_sales(conn, &sale_ids).await?,
        settled_orders: settled_orders(conn, request_ids()).await?,
        settled_failures: settled_failures(conn, request_ids()).await?,
        holders: holders(conn, &user_ids, &sale_ids).await?,
    })
}

async fn lock_sales(
    conn: &mut MySqlConnection,
    sale_ids: &BTreeSet<u64>,
) -> Result<HashMap<u64, SaleRow>, WriteError> {
    let mut q = QueryBuilder::new(
        "SELECT id, goods_id, sale_price_cents, stock_left FROM sales WHERE id IN (",
    );
    push_list(&mut q, sale_ids.iter().copied());
    q.push(") ORDER BY id FOR UPDATE");
    let mut sales = HashMap::new();
    for row in q.build().fetch_all(&mut *conn).await? {
        let sale = SaleRow {
            goods_id: row.try_get("goods_id")?,
            price_cents: row.try_get("sale_price_cents")?,
            stock_left: row.try_get("stock_left")?,
        };
        sales.insert(row.try_get("id")?, sale);
    }
    Ok(sales)
}

async fn settled_orders<'a>(
    conn: &mut MySqlConnection,
    request_ids: impl Iterator<Item = &'a str>,
) -> Result<HashMap<String, String>, WriteError> {
    let mut q = QueryBuilder::new("SELECT request_id, id FROM orders WHERE request_id IN (");
    push_list(&mut q, request_ids);
    q.push(")");
    let mut done = HashMap::new();
    for row in q.build().fetch_all(&mut *conn).await? {
        done.insert(row.try_get("request_id")?, row.try_get("id")?);
    }
    Ok(done)
}

async fn settled_failures<'a>(
    conn: &mut MySqlConnection,
    request_ids: impl Iterator<Item = &'a str>,
) -> Result<HashMap<String, FailReason>, WriteError> {
    let mut q =
        QueryBuilder::new("SELECT request_id, reason FROM failed_admissions WHERE request_id IN (");
    push_list(&mut q, request_ids);
    q.push(")");
    let mut done = HashMap::new();
    for row in q.build().fetch_all(&mut *conn).await? {
        let reason: String = row.try_get("reason")?;
        done.insert(row.try_get("request_id")?, reason.parse()?);
    }
    Ok(done)
}

async fn holders(
    conn: &mut MySqlConnection,
    user_ids: &BTreeSet<u64>,
    sale_ids: &BTreeSet<u64>,
) -> Result<HashMap<(u64, u64), String>, WriteError> {
    let mut q = QueryBuilder::new("SELECT user_id, sale_id, id FROM orders WHERE user_id IN (");
    push_list(&mut q, user_ids.iter().copied());
    q.push(") AND sale_id IN (");
    push_list(&mut q, sale_ids.iter().copied());
    q.push(")");
    let mut holders = HashMap::new();
    for row in q.build().fetch_all(&mut *conn).await? {
        let key = (row.try_get("user_id")?, row.try_get("sale_id")?);
        holders.insert(key, row.try_get("id")?);
    }
    Ok(holders)
}

/// Step 4, without I/O: settles each of the distinct `messages`, in order,
/// against `state`. A message settled before is reported again and nothing
/// is written for it; otherwise, first match wins: its reservation was
/// `released` → `released`; unknown sale → `unknown_sale`; the buyer holds
/// an order (from before, or earlier in this batch) → `duplicate`; no stock
/// left → `sold_out`; else a new order (id from `new_id`) takes one unit.
pub fn decide<'a>(
    messages: &[&'a OrderMessage],
    mut state: DbState,
    released: &HashSet<String>,
    mut new_id: impl FnMut() -> String,
) -> Plan<'a> {
    let mut plan = Plan::default();
    for &m in messages {
        let key = (m.user_id, m.sale_id);
        let (settlement, already_settled) =
            if let Some(id) = state.settled_orders.get(&m.message_id) {
                let order_id = id.clone();
                (Settlement::Success { order_id }, true)
            } else if let Some(&reason) = state.settled_failures.get(&m.message_id) {
                let existing_order = state.holders.get(&key).cloned();
                let failed = Settlement::Failed {
                    reason,
                    existing_order,
                };
                (failed, true)
            } else {
                (
                    settle_new(m, &mut state, released, &mut plan, &mut new_id),
                    false,
                )
            };
        plan.outcomes.push(Outcome {
            message: m.clone(),
            settlement,
            already_settled,
        });
    }
    plan
}

/// [`decide`] for a message not settled before: records what it writes in
/// `plan` and the unit it takes in `state`.
fn settle_new<'a>(
    m: &'a OrderMessage,
    state: &mut DbState,
    released: &HashSet<String>,
    plan: &mut Plan<'a>,
    new_id: &mut impl FnMut() -> String,
) -> Settlement {
    let key = (m.user_id, m.sale_id);
    let reason = match state.sales.get_mut(&m.sale_id) {
        _ if released.contains(&m.message_id) => FailReason::Released,
        None => FailReason::UnknownSale,
        Some(_) if state.holders.contains_key(&key) => FailReason::Duplicate,
        Some(sale) if sale.stock_left == 0 => FailReason::SoldOut,
        Some(sale) => {
            sale.stock_left -= 1;
            *plan.taken.entry(m.sale_id).or_default() += 1;
            let order_id = new_id();
            state.holders.insert(key, order_id.clone());
            plan.new_orders.push(NewOrder {
                id: order_id.clone(),
                message: m,
                goods_id: sale.goods_id,
                amount_cents: sale.price_cents,
            });
            return Settlement::Success { order_id };
        }
    };
    plan.new_failures.push((m, reason));
    let existing_order = match reason {
        FailReason::Duplicate => state.holders.get(&key).cloned(),
        _ => None,
    };
    Settlement::Failed {
        reason,
        existing_order,
    }
}

/// Steps 5–6: one guarded decrement per sale, then the rows.
async fn apply(
    conn: &mut MySqlConnection,
    plan: &Plan<'_>,
    config: WriterConfig,
) -> Result<(), WriteError> {
    for (&sale_id, &n) in &plan.taken {
        let done = sqlx::query(
            "UPDATE sales SET stock_left = stock_left - ? WHERE id = ? AND stock_left >= ?",
        )
        .bind(n)
        .bind(sale_id)
        .bind(n)
        .execute(&mut *conn)
        .await?;
        if done.rows_affected() != 1 {
            return Err(WriteError::GuardMissed(sale_id));
        }
    }
    if !plan.new_orders.is_empty() {
        insert_orders(conn, &plan.new_orders, config.order_timeout_secs).await?;
    }
    if !plan.new_failures.is_empty() {
        insert_failures(conn, &plan.new_failures).await?;
    }
    Ok(())
}

/// One multi-row insert; both times on MySQL's clock (module docs).
async fn insert_orders(
    conn: &mut MySqlConnection,
    orders: &[NewOrder<'_>],
    timeout_secs: u64,
) -> Result<(), sqlx::Error> {
    let mut q = QueryBuilder::new(
        "INSERT INTO orders (id, request_id, user_id, sale_id, goods_id, amount_cents, \
         status, created_at, expires_at) ",
    );
    q.push_values(orders, |mut b, o| {
        b.push_bind(&o.id)
            .push_bind(&o.message.message_id)
            .push_bind(o.message.user_id)
            .push_bind(o.message.sale_id)
            .push_bind(o.goods_id)
            .push_bind(o.amount_cents)
            .push_bind(OrderStatus::Unpaid)
            .push("NOW(3)")
            .push("NOW(3) + INTERVAL ")
            .push_bind_unseparated(timeout_secs)
            .push_unseparated(" SECOND");
    });
    q.build().execute(&mut *conn).await?;
    Ok(())
}

async fn insert_failures(
    conn: &mut MySqlConnection,
    failures: &[(&OrderMessage, FailReason)],
) -> Result<(), sqlx::Error> {
    let mut q = QueryBuilder::new(
        "INSERT INTO failed_admissions (request_id, user_id, sale_id, reason, created_at) ",
    );
    q.push_values(failures, |mut b, (m, reason)| {
        b.push_bind(&m.message_id)
            .push_bind(m.user_id)
            .push_bind(m.sale_id)
            .push_bind(*reason)
            .push("NOW(3)");
    });
    // A concurrent worker may have recorded the same request (unknown
    // sale: no row lock to serialise on); its row says the same thing.
    q.push(" ON DUPLICATE KEY UPDATE request_id = request_id");
    q.build().execute(&mut *conn).await?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str, sale: u64, user: u64) -> OrderMessage {
        OrderMessage::new(id.into(), sale, user, 0)
    }

    fn sale(stock_left: u32) -> SaleRow {
        SaleRow {
            goods_id: 9,
            price_cents: 990,
            stock_left,
        }
    }

    fn state(sales: &[(u64, u32)]) -> DbState {
        DbState {
            sales: sales.iter().map(|&(id, left)| (id, sale(left))).collect(),
            ..DbState::default()
        }
    }

    /// Order ids o1, o2, ... in the order `decide` asks for them.
    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("o{n}")
        }
    }

    fn failed(reason: FailReason, existing_order: Option<&str>) -> Settlement {
        Settlement::Failed {
            reason,
            existing_order: existing_order.map(String::from),
        }
    }

    fn success(id: &str) -> Settlement {
        Settlement::Success {
            order_id: id.into(),
        }
    }

    fn settlements(plan: &Plan<'_>) -> Vec<(Settlement, bool)> {
        plan.outcomes
            .iter()
            .map(|o| (o.settlement.clone(), o.already_settled))
            .collect()
    }

    #[test]
    fn the_stock_guard_sells_the_stock_and_no_more() {
        let batch = [
            msg("m1", 1, 1),
            msg("m2", 1, 2),
            msg("m3", 1, 3),
            msg("m4", 2, 1),
        ];
        let refs: Vec<&OrderMessage> = batch.iter().collect();
        let plan = decide(&refs, state(&[(1, 2), (2, 0)]), &HashSet::new(), ids());
        assert_eq!(
            settlements(&plan),
            vec![
                (success("o1"), false),
                (success("o2"), false),
                (failed(FailReason::SoldOut, None), false),
                (failed(FailReason::SoldOut, None), false),
            ]
        );
        assert_eq!(plan.taken, BTreeMap::from([(1, 2)]), "sale 2 takes nothing");
        let rows: Vec<_> = plan
            .new_orders
            .iter()
            .map(|o| (o.id.as_str(), o.message.user_id, o.goods_id, o.amount_cents))
            .collect();
        assert_eq!(rows, vec![("o1", 1, 9, 990), ("o2", 2, 9, 990)]);
        assert_eq!(plan.new_failures.len(), 2);
    }

    #[test]
    fn a_buyer_gets_one_order_per_sale_from_before_or_within_the_batch() {
        let batch = [
            msg("m1", 1, 1),
            msg("m2", 1, 2),
            msg("m3", 1, 2),
            msg("m4", 2, 2),
        ];
        let refs: Vec<&OrderMessage> = batch.iter().collect();
        let mut db = state(&[(1, 10), (2, 10)]);
        db.holders.insert((1, 1), "old".into());
        let plan = decide(&refs, db, &HashSet::new(), ids());
        assert_eq!(
            settlements(&plan),
            vec![
                (failed(FailReason::Duplicate, Some("old")), false),
                (success("o1"), false),
                (failed(FailReason::Duplicate, Some("o1")), false),
                (success("o2"), false),
            ],
            "another sale is another order"
        );
        assert_eq!(plan.taken, BTreeMap::from([(1, 1), (2, 1)]));
    }

    #[test]
    fn released_reservations_and_unknown_sales_take_no_stock() {
        let batch = [msg("m1", 1, 1), msg("m2", 1, 2), msg("m3", 3, 3)];
        let refs: Vec<&OrderMessage> = batch.iter().collect();
        let released = HashSet::from(["m1".to_string()]);
        let plan = decide(&refs, state(&[(1, 1)]), &released, ids());
        assert_eq!(
            settlements(&plan),
            vec![
                (failed(FailReason::Released, None), false),
                (success("o1"), false),
                (failed(FailReason::UnknownSale, None), false),
            ],
            "the released message left its unit to the next buyer"
        );
        let written: Vec<_> = plan
            .new_failures
            .iter()
            .map(|(m, r)| (m.message_id.as_str(), *r))
            .collect();
        assert_eq!(
            written,
            vec![
                ("m1", FailReason::Released),
                ("m3", FailReason::UnknownSale)
            ]
        );
    }

    #[test]
    fn redeliveries_report_what_was_settled_and_write_nothing() {
        let batch = [msg("m1", 1, 1), msg("m2", 1, 2), msg("m3", 1, 3)];
        let refs: Vec<&OrderMessage> = batch.iter().collect();
        let mut db = state(&[(1, 0)]);
        db.settled_orders.insert("m1".into(), "o-before".into());
        db.holders.insert((1, 1), "o-before".into());
        db.settled_failures
            .insert("m2".into(), FailReason::UnknownSale);
        // Settled before wins over a release that came later.
        db.settled_failures.insert("m3".into(), FailReason::SoldOut);
        let released = HashSet::from(["m3".to_string()]);
        let plan = decide(&refs, db, &released, ids());
        assert_eq!(
            settlements(&plan),
            vec![
                (success("o-before"), true),
                (failed(FailReason::UnknownSale, None), true),
                (failed(FailReason::SoldOut, None), true),
            ]
        );
        assert!(plan.new_orders.is_empty() && plan.new_failures.is_empty());
        assert!(plan.taken.is_empty());
    }

    #[test]
    fn copies_of_one_message_share_its_outcome() {
        let batch = [msg("m1", 1, 1), msg("m2", 1, 2), msg("m1", 1, 1)];
        let distinct = Distinct::of(&batch);
        assert_eq!(distinct.unique.len(), 2);
        let plan = decide(&distinct.unique, state(&[(1, 5)]), &HashSet::new(), ids());
        assert_eq!(plan.new_orders.len(), 2, "one order for two copies");
        let all = distinct.expand(&batch, &plan.outcomes);
        let seen: Vec<_> = all
            .iter()
            .map(|o| {
                (
                    o.message.message_id.as_str(),
                    o.settlement.clone(),
                    o.already_settled,
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                ("m1", success("o1"), false),
                ("m2", success("o2"), false),
                ("m1", success("o1"), true),
            ]
        );
    }

    #[test]
    fn errors_are_classified_for_the_consumer() {
        let redis = WriteError::Redis(redis::RedisError::from(std::io::Error::other("down")));
        assert!(redis.is_transient() && !redis.is_race());
        assert!(WriteError::Database(sqlx::Error::PoolTimedOut).is_transient());
        let guard = WriteError::GuardMissed(1);
        assert!(!guard.is_transient() && guard.is_race());
        let stored = WriteError::Stored(UnknownValue {
            kind: "admission failure reason",
            value: "vanished".into(),
        });
        assert!(!stored.is_transient() && !stored.is_race());
        assert!(!WriteError::Database(sqlx::Error::RowNotFound).is_transient());
    }
}
