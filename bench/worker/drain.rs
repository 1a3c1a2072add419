//! Drain benchmark of the order worker: 10,000 orders already queued, one
//! worker (in process, real MariaDB with the server's durable settings,
//! Redis, RabbitMQ), orders/s for batch sizes 1, 10 and 100.
//!
//! ```text
//! cargo bench -p seckill-workers --bench worker_drain
//! BENCH_MESSAGES=20000 BENCH_BATCHES=100,200 cargo bench -p seckill-workers --bench worker_drain
//! ```
//!
//! Each run gets its own database, key prefix and queues (testkit), so it
//! can run next to the test suite. The clock starts when the worker starts
//! (connect and topology declaration included) and stops when the last
//! order row is visible.

#[path = "../../workers/tests/worker_support.rs"]
mod support;

use std::time::{Duration, Instant};

use seckill_contracts::testkit::TestEnv;
use support::*;

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // useful. Only run when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        println!("worker_drain: run with `cargo bench -p seckill-workers --bench worker_drain`");
        return;
    }
    let n = env_list("BENCH_MESSAGES", &[10_000])[0];
    let batches = env_list("BENCH_BATCHES", &[1, 10, 100]);
    let probe = TestEnv::new().await;
    let db = probe.db().await;
    let flush: (String,) = sqlx::query_as("SELECT CAST(@@innodb_flush_log_at_trx_commit AS CHAR)")
        .fetch_one(&db)
        .await
        .unwrap();
    println!("innodb_flush_log_at_trx_commit = {}", flush.0);
    db.close().await;
    probe.cleanup().await;

    println!(
        "{:>6} {:>8} {:>10} {:>12}",
        "batch", "orders", "seconds", "orders/s"
    );
    for batch in batches {
        let env = TestEnv::new().await;
        let db = env.db().await;
        let sale = create_sale(&env, &db, n as u32).await;
        let messages: Vec<_> = (1..=n as u64)
            .map(|u| message(format!("bench-{u}"), sale.id, u))
            .collect();
        for chunk in messages.chunks(5_000) {
            publish(&env.config, chunk).await;
        }
        let mut config = env.config.clone();
        config.worker.batch_size = batch;
        config.worker.prefetch = u16::try_from((batch * 4).max(100)).unwrap_or(u16::MAX);
        config.log.filter = "warn".into();
        let started = Instant::now();
        let worker = InProcessWorker::start(&config).await;
        loop {
            let done = count(&db, "SELECT COUNT(*) FROM orders").await;
            if done as usize >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        worker.stop().await;
        println!("{batch:>6} {n:>8} {secs:>10.2} {:>12.0}", n as f64 / secs);
        db.close().await;
        env.cleanup().await;
    }
}
