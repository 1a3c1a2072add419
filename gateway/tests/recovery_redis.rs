//! Redis emptied in the middle of a sale (SPEC invariants 1, 3, 4): while
//! the sale's keys are gone admission fails closed (never admits blind);
//! the worker's sweeper notices, waits for the queue to drain, rebuilds
//! stock and buyer markers from MySQL and reopens the sale by itself; the
//! sale then sells out exactly, every `202` ends as one order or an explicit
//! `failed`, and the audit is clean.
//!
//! "Emptied" is every key of this test's prefix (the test shares the Redis
//! server with tests running in parallel, so it cannot FLUSHALL): the
//! sale's stock, info, buyers, reservations, results and hidden paths.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use support::recovery::{
    assert_audit_clean, assert_every_admission_settled, attempt, sell_out, OpenSale,
};

const STOCK: u32 = 100;
const BUYERS: u64 = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_emptied_mid_sale_is_rebuilt_from_mysql_without_over_or_underselling() {
    // Before: a third of the stock sells normally.
    let OpenSale {
        stack,
        worker,
        sale_id,
        tally,
    } = OpenSale::start(STOCK, 35).await;

    // Redis loses everything of this deployment, while buyers keep coming.
    let mut redis = stack.env.redis().await;
    let pattern = stack.env.keys().all_keys_pattern();
    let all: Vec<String> = redis.keys(&pattern).await.unwrap();
    assert!(!all.is_empty());
    let _: () = redis.del(&all).await.unwrap();
    let stock_key = stack.env.keys().sale(sale_id).stock();

    let mut next = 36u64;
    let mut refused_while_empty = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    // Until the sweeper rebuilt the stock counter, every attempt is refused:
    // an admission needs the counter, so a 202 can only follow a rebuild.
    loop {
        assert!(Instant::now() < deadline, "the sale was never rebuilt");
        let rebuilt: bool = redis.exists(&stock_key).await.unwrap();
        if rebuilt {
            break;
        }
        match attempt(&stack, sale_id, next, &tally).await {
            503 => refused_while_empty += 1,
            202 => {
                let rebuilt: bool = redis.exists(&stock_key).await.unwrap();
                assert!(rebuilt, "admitted while the sale's keys were gone");
                next += 1;
                break;
            }
            429 => {}
            other => panic!("unexpected {other} while the sale's keys were gone"),
        }
        next += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused_while_empty > 0, "{:?}", tally.lock().await.statuses);

    // Reopened: buyers, old and new, come until it sells out.
    let retry: Vec<u64> = {
        let t = tally.lock().await;
        (1..next).filter(|u| !t.queued.contains_key(u)).collect()
    };
    sell_out(&stack, sale_id, retry, next, BUYERS, &tally).await;
    // Early buyers already bought: they must not get a second unit.
    for user in 1..=5 {
        let status = attempt(&stack, sale_id, user, &tally).await;
        assert!(matches!(status, 409 | 410), "buyer {user} got {status}");
    }

    // Every 202 ends as exactly one order or an explicit failure, as the
    // buyer sees it through the api.
    let queued = tally.lock().await.queued.clone();
    let orders = assert_every_admission_settled(&stack, sale_id, STOCK, &queued).await;

    // Invariants 1, 2 and 4 across MySQL, Redis and the broker.
    let report = assert_audit_clean(&worker, sale_id, STOCK).await;
    // Sold out means sold out: nothing left unsold once quiet.
    assert_eq!(report["redis_stock"], 0, "undersold: {report}");
    eprintln!(
        "statuses: {:?}, orders {}",
        tally.lock().await.statuses,
        orders
    );
    drop(worker);
    match Arc::try_unwrap(stack) {
        Ok(stack) => stack.cleanup().await,
        Err(_) => panic!("stack still shared"),
    }
}
