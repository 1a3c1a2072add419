//! Prometheus metrics of the order worker, registered once per process in
//! the default registry (which `/metrics` of [`crate::probes`] serves).
//!
//! Registration happens lazily on first use, so several workers in one
//! process (as the tests run them) share the same series instead of failing
//! with a duplicate registration.

use std::sync::LazyLock;

use prometheus::{
    register_histogram, register_int_counter, register_int_counter_vec, register_int_gauge,
    Histogram, IntCounter, IntCounterVec, IntGauge,
};

/// All worker series.
pub struct WorkerMetrics {
    /// Order consumers of this process with a live broker session.
    pub consumers_live: IntGauge,
    /// Every delivery taken from the order queue, valid or not.
    pub consumed: IntCounter,
    /// Orders inserted by a committed transaction.
    pub orders_committed: IntCounter,
    /// Admissions that ended as an explicit failure, by reason
    /// (`sold_out`, `unknown_sale`, `duplicate`).
    pub failed: IntCounterVec,
    /// Deliveries whose message was already settled in MySQL (redeliveries,
    /// duplicate publishes): acked without a second write.
    pub already_processed: IntCounter,
    /// Deliveries dead-lettered, by reason (`malformed`, `delivery_limit`).
    pub dead_lettered: IntCounterVec,
    /// Deliveries handed back to the broker for a later retry, by cause.
    pub requeued: IntCounterVec,
    /// Messages per MySQL transaction.
    pub batch_size: Histogram,
    /// Wall time of one batch transaction, BEGIN to COMMIT.
    pub commit_seconds: Histogram,
    /// Admission (the Redis script's clock) to the committed order: what
    /// a buyer waits for before the result says success.
    pub end_to_end_seconds: Histogram,
    /// Unpaid orders closed on timeout, by path (`delayed` message or
    /// `sweeper` safety net).
    pub orders_closed: IntCounterVec,
    /// Close messages scheduled after commit, and those that could not be
    /// (the sweeper covers those).
    pub closes_scheduled: IntCounterVec,
    /// Sweeps run by this process (it held the sweeper lock), by result.
    pub sweeps: IntCounterVec,
    /// Reservations released by the sweeper because no message came.
    pub reservations_released: IntCounter,
    /// Sales whose Redis state the sweeper rebuilt from MySQL.
    pub reconciles: IntCounter,
}

/// The process-wide instance.
pub static METRICS: LazyLock<WorkerMetrics> = LazyLock::new(|| WorkerMetrics {
    consumers_live: register_int_gauge!(
        "seckill_worker_consumers_live",
        "Order consumers of this process with a live broker session"
    )
    .expect("register metric"),
    consumed: register_int_counter!(
        "seckill_worker_messages_consumed_total",
        "Deliveries taken from the order queue"
    )
    .expect("register metric"),
    orders_committed: register_int_counter!(
        "seckill_worker_orders_committed_total",
        "Orders inserted by committed transactions"
    )
    .expect("register metric"),
    failed: register_int_counter_vec!(
        "seckill_worker_orders_failed_total",
        "Admissions that ended as an explicit failed result, by reason",
        &["reason"]
    )
    .expect("register metric"),
    already_processed: register_int_counter!(
        "seckill_worker_already_processed_total",
        "Deliveries already settled in MySQL (redelivery or duplicate publish)"
    )
    .expect("register metric"),
    dead_lettered: register_int_counter_vec!(
        "seckill_worker_dead_lettered_total",
        "Deliveries rejected into the dead-letter queue, by reason",
        &["reason"]
    )
    .expect("register metric"),
    requeued: register_int_counter_vec!(
        "seckill_worker_requeued_total",
        "Deliveries handed back for a retry, by cause",
        &["cause"]
    )
    .expect("register metric"),
    batch_size: register_histogram!(
        "seckill_worker_batch_size",
        "Messages per MySQL transaction",
        vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0]
    )
    .expect("register metric"),
    commit_seconds: register_histogram!(
        "seckill_worker_commit_seconds",
        "Duration of one batch transaction, BEGIN to COMMIT",
        vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
    )
    .expect("register metric"),
    end_to_end_seconds: register_histogram!(
        "seckill_worker_end_to_end_seconds",
        "Admission at the gateway to the committed order",
        vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
    )
    .expect("register metric"),
    orders_closed: register_int_counter_vec!(
        "seckill_worker_orders_closed_total",
        "Unpaid orders closed on timeout, by path (delayed, sweeper)",
        &["path"]
    )
    .expect("register metric"),
    closes_scheduled: register_int_counter_vec!(
        "seckill_worker_closes_scheduled_total",
        "Delayed close messages after commit, by result (ok, failed)",
        &["result"]
    )
    .expect("register metric"),
    sweeps: register_int_counter_vec!(
        "seckill_worker_sweeps_total",
        "Sweeps run under the sweeper lock, by result (ok, error)",
        &["result"]
    )
    .expect("register metric"),
    reservations_released: register_int_counter!(
        "seckill_worker_reservations_released_total",
        "Reservations released by the sweeper because their message never came"
    )
    .expect("register metric"),
    reconciles: register_int_counter!(
        "seckill_worker_reconciles_total",
        "Sales whose Redis state the sweeper rebuilt from MySQL"
    )
    .expect("register metric"),
});
