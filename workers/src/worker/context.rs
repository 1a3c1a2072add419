//! What every part of the worker shares: the configuration, the two stores
//! and the Redis key schema, built once per process by [`super::run`] and
//! handed to the consumers, the closer and the sweeper in an `Arc`.

use std::sync::atomic::{AtomicU32, Ordering};

use seckill_contracts::config::Config;
use seckill_contracts::keys::KeySchema;
use seckill_contracts::redis_client::RedisConn;
use sqlx::MySqlPool;

use super::order_writer::WriterConfig;
use super::pace::DrainPace;

/// Configuration and the two stores.
pub struct WorkerContext {
    pub config: Config,
    pub db: MySqlPool,
    pub redis: RedisConn,
    pub keys: KeySchema,
    /// The consumers' shared write schedule (`worker.drain_orders_per_sec`).
    pub pace: DrainPace,
    /// Consecutive transient failures of batch writes, across the
    /// process's consumers; drives the requeue backoff.
    transient_failures: AtomicU32,
}

impl WorkerContext {
    pub fn new(config: Config, db: MySqlPool, redis: RedisConn) -> WorkerContext {
        let keys = KeySchema::new(config.redis.key_prefix.clone());
        let pace = DrainPace::new(
            config.worker.drain_orders_per_sec,
            std::time::Duration::from_millis(config.worker.drain_pace_max_delay_ms),
        );
        WorkerContext {
            config,
            db,
            redis,
            keys,
            pace,
            transient_failures: AtomicU32::new(0),
        }
    }

    pub(crate) fn writer_config(&self) -> WriterConfig {
        WriterConfig {
            order_timeout_secs: self.config.worker.order_timeout_secs,
        }
    }

    /// Counts one more transient failure; returns how many came before it.
    pub(crate) fn transient_failure(&self) -> u32 {
        self.transient_failures.fetch_add(1, Ordering::Relaxed)
    }

    /// A write went through: the transient trouble is over.
    pub(crate) fn transient_recovered(&self) {
        self.transient_failures.store(0, Ordering::Relaxed);
    }
}
