//! The safety net: a periodic sweep that repairs whatever the fast paths
//! missed, run by one worker at a time under a Redis lock.
//!
//! Every `worker.sweep_interval_secs` each worker tries the `sweeper` lock
//! ([`crate::lock`]); the holder (its watchdog renews the lock while the
//! sweep runs) does, in order:
//!
//! 1. **overdue orders**: closes unpaid orders past `expires_at` whose
//!    delayed close message was lost ([`crate::orders::close_expired`]);
//! 2. **unfinished stock returns**: closed orders whose unit never reached
//!    Redis (a process died between the MySQL commit and the Redis return;
//!    [`crate::orders::finish_stock_returns`]);
//! 3. **lost Redis state**: a live sale whose keys are gone (Redis restarted
//!    empty) is rebuilt from MySQL once its queue drained
//!    ([`crate::reconcile`]); admission fails closed until then;
//! 4. **orphaned reservations**: a reservation older than
//!    `worker.reservation_timeout_secs` that no worker claimed means its
//!    message never reached the broker (a gateway died between the stock
//!    decrement and the publish). `lua/shared/release.lua` gives the unit
//!    back and remembers the request id, so should the message still arrive
//!    the worker refuses it; the buyer's result becomes an explicit
//!    `failed` (SPEC invariant 3) and a `failed_admissions` row records it.
//!
//! Every step is idempotent and guarded on its own, so the lock is about
//! not doing the work N times, not about correctness: two sweepers racing
//! after a lock expiry still close each order once.

use std::time::Duration;

use seckill_contracts::reservation::{Reservation, RELEASED_TTL_SECS};
use seckill_contracts::sale_events::{self, SaleEvent, SaleEventKind};
use thiserror::Error;
use tokio::sync::watch;

use super::context::WorkerContext;
use super::metrics::METRICS;
use super::reservations;
use crate::lock::RedisLock;
use crate::{orders, reconcile};

/// The release script, shared with the gateway's rollback.
pub const RELEASE_SCRIPT: &str = seckill_contracts::scripts::RELEASE;
/// Name of the lock (under `KeySchema::lock`).
pub const LOCK_NAME: &str = "sweeper";
/// Orders handled per statement; a large backlog is worked off in rounds
/// so no transaction or Redis call grows without bound.
const BATCH: u32 = 500;

/// Why a sweep stopped early. The next sweep starts over.
#[derive(Debug, Error)]
pub enum SweepError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("mysql: {0}")]
    Db(#[from] sqlx::Error),
    #[error("lock: {0}")]
    Lock(#[from] crate::lock::LockError),
    #[error("orders: {0}")]
    Orders(#[from] orders::OrderError),
    #[error("reconcile of sale {sale_id}: {source}")]
    Reconcile {
        sale_id: u64,
        source: reconcile::ReconcileError,
    },
}

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SweepReport {
    pub orders_closed: u64,
    pub stock_returns_finished: u64,
    pub sales_reconciled: Vec<u64>,
    pub reservations_released: u64,
}

/// Sweeps every `worker.sweep_interval_secs` (the first one after one
/// interval, so a starting fleet does not stampede) until `stop`.
pub async fn run(ctx: std::sync::Arc<WorkerContext>, mut stop: watch::Receiver<bool>) {
    let interval = Duration::from_secs(ctx.config.worker.sweep_interval_secs.max(1));
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(interval) => {}
        }
        match sweep_locked(&ctx).await {
            Ok(Some(report)) => {
                METRICS.sweeps.with_label_values(&["ok"]).inc();
                if report != SweepReport::default() {
                    tracing::info!(?report, "sweep done");
                }
            }
            Ok(None) => tracing::debug!("another worker holds the sweeper lock"),
            Err(e) => {
                METRICS.sweeps.with_label_values(&["error"]).inc();
                tracing::warn!(error = %e, "sweep failed; retrying next interval");
            }
        }
    }
}

/// One sweep if this process wins the lock (`None` otherwise). The lock
/// lives a few intervals and is renewed by its watchdog, so a worker killed
/// mid-sweep frees it by expiry and another takes over.
pub async fn sweep_locked(ctx: &WorkerContext) -> Result<Option<SweepReport>, SweepError> {
    let ttl = Duration::from_secs(ctx.config.worker.sweep_interval_secs.clamp(1, 60) * 3);
    let lock = RedisLock::new(ctx.redis.clone(), &ctx.keys, LOCK_NAME, ttl);
    let Some(guard) = lock.try_acquire().await? else {
        return Ok(None);
    };
    let result = sweep(ctx).await;
    if let Err(e) = guard.release().await {
        tracing::warn!(error = %e, "releasing the sweeper lock failed; it expires by itself");
    }
    result.map(Some)
}

/// One sweep, without the lock: for callers that already hold it, and for
/// tests that prove each step is safe on its own.
pub async fn sweep(ctx: &WorkerContext) -> Result<SweepReport, SweepError> {
    let mut report = SweepReport::default();
    let mut redis = ctx.redis.clone();
    loop {
        let n = orders::close_expired(&ctx.db, &mut redis, &ctx.keys, BATCH).await?;
        report.orders_closed += n;
        if n < u64::from(BATCH) {
            break;
        }
    }
    METRICS
        .orders_closed
        .with_label_values(&["sweeper"])
        .inc_by(report.orders_closed);
    loop {
        let n = orders::finish_stock_returns(&ctx.db, &mut redis, &ctx.keys, BATCH).await?;
        report.stock_returns_finished += n;
        if n < u64::from(BATCH) {
            break;
        }
    }
    for sale_id in reconcile::live_sales(&ctx.db)
        .await
        .map_err(|source| SweepError::Reconcile { sale_id: 0, source })?
    {
        let lost = reconcile::needs_reconcile(&mut redis, &ctx.keys, sale_id)
            .await
            .map_err(|source| SweepError::Reconcile { sale_id, source })?;
        if lost {
            tracing::warn!(
                sale_id,
                "sale's Redis state is missing; rebuilding it from MySQL"
            );
            reconcile::reconcile(
                &ctx.config,
                &ctx.db,
                &mut redis,
                sale_id,
                reconcile::ReconcileOptions::default(),
            )
            .await
            .map_err(|source| SweepError::Reconcile { sale_id, source })?;
            METRICS.reconciles.inc();
            report.sales_reconciled.push(sale_id);
            continue;
        }
        report.reservations_released += release_orphans(ctx, sale_id).await?;
    }
    METRICS
        .reservations_released
        .inc_by(report.reservations_released);
    Ok(report)
}

/// Releases the sale's reservations that nobody claimed within
/// `worker.reservation_timeout_secs`. The age check is repeated inside the
/// script against Redis' clock, so a reservation a worker claims meanwhile,
/// or one younger than the timeout, is left alone.
pub async fn release_orphans(ctx: &WorkerContext, sale_id: u64) -> Result<u64, SweepError> {
    let keys = ctx.keys.sale(sale_id);
    let mut redis = ctx.redis.clone();
    let held: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(keys.reservations())
        .query_async(&mut redis)
        .await?;
    let min_age_ms = ctx
        .config
        .worker
        .reservation_timeout_secs
        .saturating_mul(1000);
    let now_ms = reservations::redis_now_ms(&mut redis).await?;
    let script = redis::Script::new(RELEASE_SCRIPT);
    let mut released = 0;
    for (user, value) in held {
        let reservation = match Reservation::parse(&value) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(sale_id, user, error = %e, "skipping an unreadable reservation");
                continue;
            }
        };
        if !reservation.is_orphan(now_ms, min_age_ms) {
            continue;
        }
        let request_id = reservation.request_id;
        let Ok(user_id) = user.parse::<u64>() else {
            continue;
        };
        let outcome: i64 = script
            .key(keys.reservations())
            .key(keys.stock())
            .key(keys.buyers())
            .key(keys.released())
            .arg(user_id)
            .arg(request_id)
            .arg(RELEASED_TTL_SECS)
            .arg(min_age_ms)
            .invoke_async(&mut redis)
            .await?;
        if outcome != 1 {
            continue;
        }
        released += 1;
        tracing::warn!(
            sale_id,
            user_id,
            request_id,
            "released a reservation whose message never came"
        );
        reservations::record_released(&ctx.db, request_id, user_id, sale_id).await?;
        reservations::publish_released_result(&mut redis, &keys, user_id).await?;
    }
    if released > 0 {
        // Units came back: every gateway drops its sold-out mark.
        let event = SaleEvent {
            sale_id,
            kind: SaleEventKind::Reopened,
        };
        if let Err(e) = sale_events::publish(&mut redis, &ctx.keys, event).await {
            tracing::warn!(sale_id, error = %e, "could not announce the reopened sale");
        }
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sweeper releases with the shipped `lua/shared/release.lua`, the
    /// same text the gateway's rollback runs (its own test checks the same).
    #[test]
    fn the_sweeper_runs_the_shared_release_script() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../lua/shared/release.lua");
        let shipped = std::fs::read_to_string(file).unwrap();
        assert_eq!(
            redis::Script::new(RELEASE_SCRIPT).get_hash(),
            redis::Script::new(&shipped).get_hash()
        );
    }
}
