//! RabbitMQ restarted in the middle of a sale (SPEC invariant 3): every
//! `202 queued` still ends as exactly one order or an explicit `failed`,
//! a `503` gave its unit back, nothing sells twice, and after a reconcile
//! the audit is clean.
//!
//! The restart is real: `rabbitmqctl stop_app` / `start_app` on the local
//! node, which drops every client connection while durable queues and
//! persistent messages survive, as on a broker restart. Because that
//! disturbs every client of the broker, this file holds exactly one test:
//! `cargo test` runs test binaries one after another, so nothing else talks
//! to the broker meanwhile.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::recovery::{
    assert_audit_clean, assert_every_admission_settled, attempt, sell_out, OpenSale,
};

const STOCK: u32 = 300;
const BUYERS: u64 = 800;

fn rabbitmqctl(arg: &str) {
    let out = Command::new("rabbitmqctl")
        .arg(arg)
        .output()
        .expect("rabbitmqctl is installed with RabbitMQ (scripts/up)");
    assert!(
        out.status.success(),
        "rabbitmqctl {arg}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the broker app again even if the test panics half-way, so a
/// failure here never leaves the machine without RabbitMQ.
struct RestartGuard;
impl Drop for RestartGuard {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_restarted_mid_sale_loses_nothing_admitted() {
    // Our own worker, with a sweeper fast enough to release, within the
    // test, a reservation whose publish died with the broker. Before the
    // restart a third of the stock sells normally.
    let OpenSale {
        stack,
        worker,
        sale_id,
        tally,
    } = OpenSale::start(STOCK, 40).await;

    // During: buyers keep coming while the broker goes down and comes back.
    let guard = RestartGuard;
    let load = {
        let (stack, tally) = (stack.clone(), tally.clone());
        tokio::spawn(async move {
            let mut next = 41u64;
            let started = Instant::now();
            // ~20 attempts a second, so the sale outlasts the restart.
            while started.elapsed() < Duration::from_secs(8) && next <= 240 {
                let batch: Vec<u64> = (next..next + 2).collect();
                next += 2;
                futures::future::join_all(
                    batch.iter().map(|u| attempt(&stack, sale_id, *u, &tally)),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            next
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    tokio::task::spawn_blocking(|| rabbitmqctl("stop_app"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::spawn_blocking(|| rabbitmqctl("start_app"))
        .await
        .unwrap();
    drop(guard);
    let next = load.await.unwrap();
    assert!(
        tally.lock().await.statuses.get(&503).copied().unwrap_or(0) > 0,
        "the restart was not noticed: {:?}",
        tally.lock().await.statuses
    );

    // After: refused buyers retry and new ones come until it sells out.
    let refused: Vec<u64> = {
        let t = tally.lock().await;
        (41..next).filter(|u| !t.queued.contains_key(u)).collect()
    };
    sell_out(&stack, sale_id, refused, next, BUYERS, &tally).await;

    // Every 202 ends as an order or an explicit failure.
    let queued = tally.lock().await.queued.clone();
    let orders = assert_every_admission_settled(&stack, sale_id, STOCK, &queued).await;

    // Reconcile, then the audit of invariants 1, 2 and 4 is clean.
    let (ok, report) = worker
        .ctl(&["reconcile", "--sale", &sale_id.to_string()])
        .await;
    assert!(ok, "reconcile: {report}");
    assert_audit_clean(&worker, sale_id, STOCK).await;
    let statuses = tally.lock().await.statuses.clone();
    eprintln!("statuses: {statuses:?}, orders {orders}");
    drop(worker);
    match Arc::try_unwrap(stack) {
        Ok(stack) => stack.cleanup().await,
        Err(_) => panic!("stack still shared"),
    }
}
