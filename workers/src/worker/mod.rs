//! The order worker (`seckill-worker`): drains the order queue into MySQL.
//!
//! Data flow for one admitted purchase:
//!
//! ```text
//! order queue ──▶ consumer (batches of N msgs / T ms) ──▶ order_writer (one MySQL tx)
//!                                                              │ commit
//!                                                              ▼
//!                      ack ◀── results (Redis: result key, reservation settled)
//! ```
//!
//! * [`context`]: what they all share (config, MySQL, Redis, key schema);
//! * [`consumer`]: batching, ack/requeue/dead-letter policy;
//! * [`pace`]: peak shaving, the process's write schedule
//!   (`worker.drain_orders_per_sec`);
//! * `broker_session`: the connection, topology and reconnect loop the
//!   order and close consumers share, with the `backoff` curve every retry
//!   loop of the worker uses;
//! * [`reservations`]: claims the batch's Redis reservations first, so a
//!   gateway rollback and a late message can never both count;
//! * [`order_writer`]: the idempotent, oversell-proof batch transaction;
//! * [`results`]: results for polling and reservation settlement in Redis;
//! * [`metrics`]: the Prometheus series;
//! * [`closer`]: schedules each new order's delayed close message and
//!   consumes the close queue (unpaid orders close on timeout);
//! * [`sweeper`]: the periodic safety net under a Redis lock (overdue
//!   orders, unfinished stock returns, lost Redis state, orphaned
//!   reservations);
//! * [`dlq`]: listing and replaying dead-lettered messages (ops).
//!
//! [`run`] serves `/healthz` and `/metrics` next to the consumer until the
//! shutdown future resolves, then finishes the batch in flight and closes.

mod backoff;
mod broker_session;
pub mod closer;
pub mod consumer;
pub mod context;
pub mod dlq;
pub mod metrics;
pub mod order_writer;
pub mod pace;
pub mod reservations;
pub mod results;
pub mod sweeper;

use std::future::Future;
use std::sync::Arc;

use seckill_contracts::config::Config;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::{connections, probes};

pub use context::WorkerContext;

/// Independent consumers (each its own connection, channel and prefetch
/// window) per process. Batches of one sale serialise on its row lock in
/// MySQL, but while one consumer commits, the other parses, settles Redis
/// and acks, which is where a second consumer pays off on a small machine.
pub const CONSUMERS_PER_PROCESS: usize = 2;

/// Runs the worker until `shutdown` resolves: probes on `listener` and
/// [`CONSUMERS_PER_PROCESS`] order consumers, the close consumer and the
/// sweeper. Fails only when MySQL or Redis cannot be reached at start
/// (the broker is retried with backoff for as long as the process runs).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    // Touch the metrics so /metrics lists them before the first message.
    std::sync::LazyLock::force(&metrics::METRICS);

    let db = connections::mysql(&config.database).await?;
    let redis = connections::redis(&config).await?;
    let ctx = Arc::new(WorkerContext::new(config, db.clone(), redis));
    if let Ok(addr) = listener.local_addr() {
        crate::fleet_report::spawn_worker(
            ctx.redis.clone(),
            ctx.keys.clone(),
            db.clone(),
            addr.port(),
        );
    }

    tracing::info!(addr = ?listener.local_addr().ok(), "worker probes listening");
    let mut probe_stop = stop_rx.clone();
    let probes = axum::serve(listener, probes::router::<()>()).with_graceful_shutdown(async move {
        let _ = probe_stop.wait_for(|s| *s).await;
    });
    let consumers = (0..CONSUMERS_PER_PROCESS)
        .map(|i| tokio::spawn(consumer::consume(ctx.clone(), stop_rx.clone(), i)));
    let consumers = consumers
        .chain([
            tokio::spawn(closer::consume(ctx.clone(), stop_rx.clone())),
            tokio::spawn(sweeper::run(ctx.clone(), stop_rx.clone())),
        ])
        .collect::<Vec<_>>();
    let consumers = futures::future::join_all(consumers);
    let (served, joined) = tokio::join!(probes, consumers);
    for j in joined {
        if let Err(e) = j {
            tracing::error!(error = %e, "order consumer task failed");
        }
    }
    db.close().await;
    tracing::info!("order worker stopped");
    served?;
    Ok(())
}
