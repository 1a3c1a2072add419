//! Rebuilds a sale's Redis state from MySQL, the source of truth: after
//! Redis restarted empty mid-sale, or whenever an operator suspects drift
//! (`seckillctl reconcile --sale ID`). The sweeper runs it by itself for a
//! live sale whose keys are gone ([`needs_reconcile`]).
//!
//! ```text
//! pause      DEL stock counter → every admission answers "not ready"
//!            (admit.lua fails closed), nothing new enters the pipeline
//! drain      wait amqp.confirm_timeout (publishes in flight confirm or
//!            roll back), then until the order queue is empty, no worker
//!            holds a claimed reservation and the sale's MySQL figures
//!            stood still for `settle` (bounded by `max_wait`)
//! release    reservations nobody claimed: their message never came; the
//!            request ids go to the released set (a late message is
//!            refused) and each gets an explicit `failed` result
//! rebuild    one MySQL transaction holding the sale's row lock, so no
//!            order is written or closed meanwhile:
//!              stock   = sales.stock_left
//!              buyers  = every order's user (any status: invariant 2)
//!              returned = every closed order (its unit is in stock_left)
//!            written by lua/redis/rebuild_sale.lua in one step
//! reopen     re-warm the sale info, announce `updated` (and `reopened`)
//! ```
//!
//! The pause is what makes the rebuild exact: with the counter gone no
//! admission can take a unit, a gateway rollback or a worker's failed
//! settlement gives nothing back (they only raise an existing counter), and
//! a closed order's Redis return finds no counter and leaves it to this
//! rebuild. A claimed reservation makes the rebuild wait (its order is not
//! in MySQL's figures yet). The drain wait relies on the order queue being
//! empty: with several busy sales sharing one queue it can time out, which
//! leaves the sale paused and is reported; the sweeper tries again.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use lapin::{Connection, ConnectionProperties};
use redis::aio::ConnectionLike;
use seckill_contracts::config::Config;
use seckill_contracts::keys::{KeySchema, SaleKeys};
use seckill_contracts::sale_events::{self, SaleEvent, SaleEventKind};
use serde::Serialize;
use sqlx::MySqlPool;

use crate::audit;
use crate::sales::{self, SaleError};
use crate::worker::reservations::{self, RELEASED_TTL_SECS};

/// The rebuild script.
pub const REBUILD_SCRIPT: &str = include_str!("../../lua/redis/rebuild_sale.lua");
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
    let _: () = redis::cmd("DEL").arg(k.stock()).query_async(redis).await?;
    announce(redis, &keys, sale_id, SaleEventKind::Updated).await;
    tracing::info!(sale_id, "sale paused for reconcile");

    // Publishes that were in flight at the pause either confirm (their
    // message is queued) or roll back within the confirm timeout.
    tokio::time::sleep(Duration::from_millis(config.amqp.confirm_timeout_ms)).await;
    let deadline = started + opts.max_wait;
    let broker = Connection::connect(&config.amqp.url, ConnectionProperties::default()).await?;
    let result = async {
        loop {
            wait_quiet(config, db, redis, &broker, &k, sale_id, opts, deadline).await?;
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

/// Waits until the queue is empty, no reservation is claimed and the
/// sale's MySQL figures stood still for `opts.settle`.
#[allow(clippy::too_many_arguments)]
async fn wait_quiet<C: ConnectionLike>(
    config: &Config,
    db: &MySqlPool,
    redis: &mut C,
    broker: &Connection,
    k: &SaleKeys,
    sale_id: u64,
    opts: ReconcileOptions,
    deadline: Instant,
) -> Result<(), ReconcileError> {
    let mut last: Option<(i64, i64)> = None;
    let mut stable_since = Instant::now();
    loop {
        let figures: (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM orders WHERE sale_id = ?), \
                    (SELECT COUNT(*) FROM failed_admissions WHERE sale_id = ?)",
        )
        .bind(sale_id)
        .bind(sale_id)
        .fetch_one(db)
        .await?;
        if last != Some(figures) {
            last = Some(figures);
            stable_since = Instant::now();
        }
        let queued = audit::queue_depth(broker, &config.amqp.queue).await?;
        let claimed = claimed_reservations(redis, k).await?;
        if queued == 0 && claimed == 0 && stable_since.elapsed() >= opts.settle {
            return Ok(());
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                sale_id,
                queued,
                claimed,
                "reconcile gave up waiting for quiet"
            );
            return Err(ReconcileError::NotQuiet(opts.max_wait));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn claimed_reservations<C: ConnectionLike>(
    redis: &mut C,
    k: &SaleKeys,
) -> Result<usize, ReconcileError> {
    let held: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(k.reservations())
        .query_async(redis)
        .await?;
    Ok(held.iter().filter(|(_, v)| v.ends_with(":c")).count())
}

/// The rebuild transaction; `None` when a claimed reservation appeared.
async fn rebuild<C: ConnectionLike>(
    db: &MySqlPool,
    redis: &mut C,
    k: &SaleKeys,
    sale_id: u64,
) -> Result<Option<ReconcileReport>, ReconcileError> {
    let held: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(k.reservations())
        .query_async(redis)
        .await?;
    // Unclaimed reservations: "<request_id>:<admitted_ms>".
    let orphans: Vec<(u64, String)> = held
        .iter()
        .filter(|(_, v)| !v.ends_with(":c"))
        .filter_map(|(user, v)| {
            let (rid, _) = v.rsplit_once(':')?;
            Some((user.parse().ok()?, rid.to_string()))
        })
        .collect();

    let mut tx = db.begin().await?;
    let stock: Option<i64> =
        sqlx::query_scalar("SELECT CAST(stock_left AS SIGNED) FROM sales WHERE id = ? FOR UPDATE")
            .bind(sale_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(stock) = stock else {
        return Err(ReconcileError::UnknownSale(sale_id));
    };
    let buyers: Vec<u64> = sqlx::query_scalar("SELECT user_id FROM orders WHERE sale_id = ?")
        .bind(sale_id)
        .fetch_all(&mut *tx)
        .await?;
    let returned: Vec<String> =
        sqlx::query_scalar("SELECT id FROM orders WHERE sale_id = ? AND status = 'closed'")
            .bind(sale_id)
            .fetch_all(&mut *tx)
            .await?;
    for (user_id, rid) in &orphans {
        reservations::record_released(&mut *tx, rid, *user_id, sale_id).await?;
    }

    let mut call = REBUILD.key(k.stock());
    call.key(k.buyers())
        .key(k.returned())
        .key(k.reservations())
        .key(k.released())
        .arg(stock)
        .arg(RELEASED_TTL_SECS)
        .arg(buyers.len());
    for b in &buyers {
        call.arg(*b);
    }
    call.arg(returned.len());
    for r in &returned {
        call.arg(r);
    }
    call.arg(orphans.len());
    for (user, rid) in &orphans {
        call.arg(*user).arg(rid);
    }
    let (status, _): (String, String) = call.invoke_async(redis).await?;
    if status != "ok" {
        tx.rollback().await?;
        return Ok(None);
    }
    sqlx::query(
        "UPDATE orders SET stock_returned_at = NOW(3) \
         WHERE sale_id = ? AND status = 'closed' AND stock_returned_at IS NULL",
    )
    .bind(sale_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;

    for (user_id, rid) in &orphans {
        tracing::warn!(sale_id, user_id, request_id = %rid, "released a reservation whose message never came");
        reservations::publish_released_result(redis, k, *user_id).await?;
    }
    Ok(Some(ReconcileReport {
        sale_id,
        stock,
        buyers: buyers.len(),
        returned: returned.len(),
        released: orphans.len(),
        waited_ms: 0,
    }))
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
