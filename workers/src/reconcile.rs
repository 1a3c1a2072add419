//! Rebuilds a sale's Redis state from MySQL, the source of truth: after
//! Redis restarted empty mid-sale, or whenever an operator suspects drift
//! (`seckillctl reconcile --sale ID`). The sweeper runs it by itself for a
//! live sale whose keys are gone ([`needs_reconcile`]).
//!
//! ```text
//! pause      DEL stock counter → every admission answers "not ready"
//!            (admit.lua fails closed), nothing new enters the pipeline
//! drain      wait amqp.confirm_timeout (publishes in flight confirm or
//!            roll back), then until this sale's admissions in flight are
//!            settled (below), no worker holds a claimed reservation and
//!            the sale's MySQL figures stood still for `settle` (bounded
//!            by `max_wait`)
//! release    reservations nobody claimed: their message never came; the
//!            request ids go to the released set (a late message is
//!            refused) and each gets an explicit `failed` result
//! rebuild    one MySQL transaction holding the sale's row lock, so no
//!            order is written or closed meanwhile:
//!              stock   = sales.stock_left
//!              buyers  = every order's user (any status: invariant 2)
//!              returned = every closed order (its unit is in stock_left)
//!            written by lua/workers/rebuild_sale.lua in one step
//! reopen     re-warm the sale info, announce `updated` (and `reopened`)
//! ```
//!
//! The pause is what makes the rebuild exact: with the counter gone no
//! admission can take a unit, a gateway rollback or a worker's failed
//! settlement gives nothing back (they only raise an existing counter), and
//! a closed order's Redis return finds no counter and leaves it to this
//! rebuild. A claimed reservation makes the rebuild wait (its order is not
//! in MySQL's figures yet).
//!
//! The drain waits for this sale's messages only, not for the order queue
//! every sale shares (other sales may keep it busy indefinitely). Every
//! admission writes its reservation with its stock decrement, and the
//! reservation goes only when the admission settles or is released, so the
//! sale's reservations are exactly its admissions in flight: the drain
//! waits until none is claimed and every unclaimed one is either an orphan
//! (older than `worker.reservation_timeout_secs`, the sweeper's rule) or
//! the queue is empty (its message never came). A message of the sale
//! without a reservation can no longer move stock (settled before, or
//! released and refused by the claim). Only when the sale's info hash was
//! gone at the start (Redis lost the sale, reservations and all) is an
//! empty queue the one proof that its messages were consumed; Redis losing
//! its data stops every sale's admissions, so that queue does drain.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use lapin::{Connection, ConnectionProperties};
use redis::aio::ConnectionLike;
use seckill_contracts::brokers;
use seckill_contracts::config::Config;
use seckill_contracts::keys::{KeySchema, SaleKeys};
use seckill_contracts::reservation::{Reservation, RELEASED_TTL_SECS};
use seckill_contracts::sale_events::{self, SaleEvent, SaleEventKind};
use serde::Serialize;
use sqlx::MySqlPool;

use crate::audit;
use crate::sales::{self, SaleError};
use crate::statuses::OrderStatus;
use crate::worker::reservations;

/// The rebuild script.
pub const REBUILD_SCRIPT: &str = include_str!("../../lua/workers/rebuild_sale.lua");
static REBUILD: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(REBUILD_SCRIPT));
/// Sales that ended longer ago than this are not rebuilt automatically.
const LIVE_AFTER_END_SECS: u64 = 24 * 3600;
const POLL: Duration = Duration::from_millis(200);

/// How long to wait for the pipeline to go quiet.
#[derive(Debug, Clone, Copy)]
pub struct ReconcileOptions {
    /// Give up (the sale stays paused) after this long.
    pub max_wait: Duration,
    /// MySQL figures must stand still this long to count as drained.
    pub settle: Duration,
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        ReconcileOptions {
            max_wait: Duration::from_secs(30),
            settle: Duration::from_secs(1),
        }
    }
}

/// Why a reconcile did not finish. The sale stays paused (admission fails
/// closed), which is safe; running it again resumes.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("no sale with id {0}")]
    UnknownSale(u64),
    #[error("the order pipeline did not go quiet within {0:?}; the sale stays paused")]
    NotQuiet(Duration),
    #[error("MySQL: {0}")]
    Db(#[from] sqlx::Error),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    #[error("sale: {0}")]
    Sale(#[from] SaleError),
}

/// What a reconcile did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    pub sale_id: u64,
    /// The rebuilt stock counter (MySQL's `stock_left`).
    pub stock: i64,
    /// Buyer markers written (one per order).
    pub buyers: usize,
    /// Closed orders recorded as returned.
    pub returned: usize,
    /// Reservations released because their message never came.
    pub released: usize,
    /// Time spent waiting for the pipeline to drain.
    pub waited_ms: u64,
}

/// Sales whose Redis state matters now: not ended more than a day ago
/// (closes keep returning stock after the end).
pub async fn live_sales(db: &MySqlPool) -> Result<Vec<u64>, ReconcileError> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM sales WHERE ends_at > NOW(3) - INTERVAL ? SECOND ORDER BY id",
    )
    .bind(LIVE_AFTER_END_SECS)
    .fetch_all(db)
    .await?)
}

/// True when the sale's info or stock counter is missing in Redis (Redis
/// restarted empty or was flushed): admission refuses until a reconcile.
pub async fn needs_reconcile<C: ConnectionLike>(
    redis: &mut C,
    keys: &KeySchema,
    sale_id: u64,
) -> Result<bool, ReconcileError> {
    let k = keys.sale(sale_id);
    let (info, stock): (bool, bool) = redis::pipe()
        .exists(k.info())
        .exists(k.stock())
        .query_async(redis)
        .await?;
    Ok(!(info && stock))
}

/// Pauses, drains, rebuilds and reopens sale `sale_id` (module docs).
pub async fn reconcile<C: ConnectionLike>(
    config: &Config,
    db: &MySqlPool,
    redis: &mut C,
    sale_id: u64,
    opts: ReconcileOptions,
) -> Result<ReconcileReport, ReconcileError> {
    let keys = KeySchema::new(config.redis.key_prefix.clone());
    let k = keys.sale(sale_id);
    let Some(_) = sales::get(db, sale_id).await? else {
        return Err(ReconcileError::UnknownSale(sale_id));
    };
    let started = Instant::now();
    let intact: bool = redis::cmd("EXISTS")
        .arg(k.info())
        .query_async(redis)
        .await?;
    let scope = if intact {
        InFlight::Reservations
    } else {
        InFlight::WholeQueue
    };
    let _: () = redis::cmd("DEL").arg(k.stock()).query_async(redis).await?;
    announce(redis, &keys, sale_id, SaleEventKind::Updated).await;
    tracing::info!(sale_id, "sale paused for reconcile");

    // Publishes that were in flight at the pause either confirm (their
    // message is queued) or roll back within the confirm timeout.
    tokio::time::sleep(Duration::from_millis(config.amqp.confirm_timeout_ms)).await;
    let deadline = started + opts.max_wait;
    let (broker, _) = brokers::connect(&config.amqp, ConnectionProperties::default()).await?;
    let drain = Drain {
        config,
        broker: &broker,
        scope,
        opts,
        deadline,
    };
    let result = async {
        loop {
            drain.wait_quiet(db, redis, &k, sale_id).await?;
            match rebuild(db, redis, &k, sale_id).await? {
                Some(report) => break Ok(report),
                // A worker claimed a reservation meanwhile: drain again.
                None if Instant::now() < deadline => tokio::time::sleep(POLL).await,
                None => break Err(ReconcileError::NotQuiet(opts.max_wait)),
            }
        }
    }
    .await;
    let _ = broker.close(200, "reconcile done".into()).await;
    let mut report = result?;
    report.waited_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);

    // Re-write the info hash (the counter exists now, so it is only ever
    // lowered) and tell every gateway.
    if let Some(sale) = sales::get(db, sale_id).await? {
        sales::warm(redis, &keys, &sale).await?;
    }
    if report.stock > 0 {
        announce(redis, &keys, sale_id, SaleEventKind::Reopened).await;
    }
    tracing::info!(?report, "sale reconciled");
    Ok(report)
}

/// Which admissions of the sale a reconcile waits for (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InFlight {
    /// Its reservations: they are its admissions in flight.
    Reservations,
    /// Redis lost the sale, reservations included: wait for the whole
    /// order queue to drain.
    WholeQueue,
}

/// What the pipeline holds for the sale at one look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InFlightNow {
    /// Messages ready in the shared order queue.
    queued: u32,
    /// Reservations a worker claimed: orders being written.
    claimed: usize,
    /// Unclaimed reservations younger than the reservation timeout: their
    /// message may still be in the queue.
    waiting: usize,
}

impl InFlightNow {
    fn quiet(&self, scope: InFlight) -> bool {
        self.claimed == 0
            && match scope {
                InFlight::WholeQueue => self.queued == 0,
                InFlight::Reservations => self.waiting == 0 || self.queued == 0,
            }
    }
}

/// The drain wait of one reconcile.
struct Drain<'a> {
    config: &'a Config,
    broker: &'a Connection,
    scope: InFlight,
    opts: ReconcileOptions,
    deadline: Instant,
}

impl Drain<'_> {
    /// Waits until the sale's admissions in flight are settled
    /// ([`InFlightNow::quiet`]) and its MySQL figures stood still for
    /// `opts.settle`.
    async fn wait_quiet<C: ConnectionLike>(
        &self,
        db: &MySqlPool,
        redis: &mut C,
        k: &SaleKeys,
        sale_id: u64,
    ) -> Result<(), ReconcileError> {
        let mut last: Option<(i64, i64)> = None;
        let mut stable_since = Instant::now();
        loop {
            let figures = mysql_figures(db, sale_id).await?;
            if last != Some(figures) {
                last = Some(figures);
                stable_since = Instant::now();
            }
            let now = self.look(redis, k).await?;
            if now.quiet(self.scope) && stable_since.elapsed() >= self.opts.settle {
                return Ok(());
            }
            if Instant::now() >= self.deadline {
                tracing::warn!(sale_id, ?now, scope = ?self.scope, "reconcile gave up waiting for quiet");
                return Err(ReconcileError::NotQuiet(self.opts.max_wait));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn look<C: ConnectionLike>(
        &self,
        redis: &mut C,
        k: &SaleKeys,
    ) -> Result<InFlightNow, ReconcileError> {
        let held = reservation_values(redis, k).await?;
        let now_ms = reservations::redis_now_ms(redis).await?;
        let timeout_ms = self
            .config
            .worker
            .reservation_timeout_secs
            .saturating_mul(1000);
        let parsed: Vec<Reservation<'_>> = held
            .iter()
            .filter_map(|(_, v)| Reservation::parse(v).ok())
            .collect();
        Ok(InFlightNow {
            queued: audit::queue_depth(self.broker, &self.config.amqp.queue).await?,
            claimed: parsed.iter().filter(|r| r.claimed).count(),
            waiting: parsed
                .iter()
                .filter(|r| !r.claimed && !r.is_orphan(now_ms, timeout_ms))
                .count(),
        })
    }
}

/// The sale's orders and failed admissions: they stand still once nothing
/// of the sale is being written.
async fn mysql_figures(db: &MySqlPool, sale_id: u64) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM orders WHERE sale_id = ?), \
                (SELECT COUNT(*) FROM failed_admissions WHERE sale_id = ?)",
    )
    .bind(sale_id)
    .bind(sale_id)
    .fetch_one(db)
    .await
}

/// The sale's reservations: (user id field, value).
async fn reservation_values<C: ConnectionLike>(
    redis: &mut C,
    k: &SaleKeys,
) -> Result<Vec<(String, String)>, redis::RedisError> {
    redis::cmd("HGETALL")
        .arg(k.reservations())
        .query_async(redis)
        .await
}

/// Unclaimed reservations as (user, request id): at rebuild time their
/// message is not coming (the drain is over), so they are released.
fn orphans(held: &[(String, String)]) -> Vec<(u64, String)> {
    held.iter()
        .filter_map(|(user, value)| {
            let r = Reservation::parse(value).ok().filter(|r| !r.claimed)?;
            Some((user.parse().ok()?, r.request_id.to_string()))
        })
        .collect()
}

/// What MySQL says the sale's Redis state is, read in `tx` under the
/// sale's row lock.
struct Truth {
    stock: i64,
    /// Every order's buyer, whatever the status (invariant 2).
    buyers: Vec<u64>,
    /// Closed orders: their unit is in `stock_left`.
    returned: Vec<String>,
}

async fn read_truth(tx: &mut sqlx::MySqlConnection, sale_id: u64) -> Result<Truth, ReconcileError> {
    let stock: Option<i64> =
        sqlx::query_scalar("SELECT CAST(stock_left AS SIGNED) FROM sales WHERE id = ? FOR UPDATE")
            .bind(sale_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(stock) = stock else {
        return Err(ReconcileError::UnknownSale(sale_id));
    };
    let buyers = sqlx::query_scalar("SELECT user_id FROM orders WHERE sale_id = ?")
        .bind(sale_id)
        .fetch_all(&mut *tx)
        .await?;
    let returned = sqlx::query_scalar("SELECT id FROM orders WHERE sale_id = ? AND status = ?")
        .bind(sale_id)
        .bind(OrderStatus::Closed)
        .fetch_all(&mut *tx)
        .await?;
    Ok(Truth {
        stock,
        buyers,
        returned,
    })
}

/// The rebuild transaction; `None` when a claimed reservation appeared.
async fn rebuild<C: ConnectionLike>(
    db: &MySqlPool,
    redis: &mut C,
    k: &SaleKeys,
    sale_id: u64,
) -> Result<Option<ReconcileReport>, ReconcileError> {
    let orphans = orphans(&reservation_values(redis, k).await?);
    let mut tx = db.begin().await?;
    let truth = read_truth(&mut tx, sale_id).await?;
    for (user_id, rid) in &orphans {
        reservations::record_released(&mut *tx, rid, *user_id, sale_id).await?;
    }
    if !rebuild_in_redis(redis, k, &truth, &orphans).await? {
        tx.rollback().await?;
        return Ok(None);
    }
    sqlx::query(
        "UPDATE orders SET stock_returned_at = NOW(3) \
         WHERE sale_id = ? AND status = ? AND stock_returned_at IS NULL",
    )
    .bind(sale_id)
    .bind(OrderStatus::Closed)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;

    for (user_id, rid) in &orphans {
        tracing::warn!(sale_id, user_id, request_id = %rid, "released a reservation whose message never came");
        reservations::publish_released_result(redis, k, *user_id).await?;
    }
    Ok(Some(ReconcileReport {
        sale_id,
        stock: truth.stock,
        buyers: truth.buyers.len(),
        returned: truth.returned.len(),
        released: orphans.len(),
        waited_ms: 0,
    }))
}

/// Writes `truth` with `rebuild_sale.lua` and releases `orphans`; false
/// (nothing written) when a worker holds a claimed reservation.
async fn rebuild_in_redis<C: ConnectionLike>(
    redis: &mut C,
    k: &SaleKeys,
    truth: &Truth,
    orphans: &[(u64, String)],
) -> Result<bool, redis::RedisError> {
    let mut call = REBUILD.key(k.stock());
    call.key(k.buyers())
        .key(k.returned())
        .key(k.reservations())
        .key(k.released())
        .arg(truth.stock)
        .arg(RELEASED_TTL_SECS)
        .arg(truth.buyers.len());
    for b in &truth.buyers {
        call.arg(*b);
    }
    call.arg(truth.returned.len());
    for r in &truth.returned {
        call.arg(r);
    }
    call.arg(orphans.len());
    for (user, rid) in orphans {
        call.arg(*user).arg(rid);
    }
    let (status, _): (String, String) = call.invoke_async(redis).await?;
    Ok(status == "ok")
}

async fn announce<C: ConnectionLike>(
    redis: &mut C,
    keys: &KeySchema,
    sale_id: u64,
    kind: SaleEventKind,
) {
    if let Err(e) = sale_events::publish(redis, keys, SaleEvent { sale_id, kind }).await {
        tracing::warn!(sale_id, error = %e, "could not announce the sale change");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now(queued: u32, claimed: usize, waiting: usize) -> InFlightNow {
        InFlightNow {
            queued,
            claimed,
            waiting,
        }
    }

    #[test]
    fn another_sales_backlog_does_not_hold_a_reconcile() {
        assert!(now(500, 0, 0).quiet(InFlight::Reservations));
        assert!(!now(500, 0, 0).quiet(InFlight::WholeQueue));
    }

    #[test]
    fn the_sales_own_admissions_do() {
        // Its message may be among the queued ones.
        assert!(!now(3, 0, 1).quiet(InFlight::Reservations));
        // An order is being written.
        assert!(!now(0, 1, 0).quiet(InFlight::Reservations));
        assert!(!now(0, 1, 0).quiet(InFlight::WholeQueue));
        // Nothing queued: an unclaimed reservation's message never came.
        assert!(now(0, 0, 1).quiet(InFlight::Reservations));
        assert!(now(0, 0, 0).quiet(InFlight::WholeQueue));
    }

    #[test]
    fn unclaimed_reservations_are_the_orphans_released() {
        let held = vec![
            ("1".to_string(), "r1:1000".to_string()),
            ("2".to_string(), "r2:1000:c".to_string()),
            ("3".to_string(), "garbage".to_string()),
            ("x".to_string(), "r4:1000".to_string()),
        ];
        assert_eq!(orphans(&held), vec![(1, "r1".to_string())]);
    }
}
