//! `reconcile` of one sale against the real MariaDB, Redis and RabbitMQ:
//! it waits for that sale's own in-flight admissions, not for the order
//! queue the sale shares with every other sale to drain. Each test has its
//! own database, key prefix and queues (`TestEnv`).

#[path = "worker_support.rs"]
mod support;

use std::time::Duration;

use redis::AsyncCommands;
use seckill_contracts::reservation::Reservation;
use seckill_contracts::testkit::TestEnv;
use seckill_workers::reconcile::{self, ReconcileError, ReconcileOptions};
use support::*;

fn opts(max_wait_ms: u64) -> ReconcileOptions {
    ReconcileOptions {
        max_wait: Duration::from_millis(max_wait_ms),
        settle: Duration::from_millis(200),
    }
}

/// Admits `user` to `sale` the way `admit.lua` does (stock down, buyer
/// marked, reservation on the Redis clock) and publishes its message.
async fn admit(env: &TestEnv, sale: u64, user: u64) -> String {
    let k = env.keys().sale(sale);
    let mut redis = env.redis().await;
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut redis).await.unwrap();
    let request_id = format!("{}-a{user}", env.id);
    let value = Reservation {
        request_id: &request_id,
        admitted_ms: secs * 1000 + micros / 1000,
        claimed: false,
    }
    .value();
    let _: () = redis::pipe()
        .decr(k.stock(), 1)
        .ignore()
        .sadd(k.buyers(), user)
        .ignore()
        .hset(k.reservations(), user, value)
        .ignore()
        .query_async(&mut redis)
        .await
        .unwrap();
    publish(&env.config, &[message(&request_id, sale, user)]).await;
    request_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_waits_for_its_sales_messages_not_for_the_shared_queue() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let mine = create_sale(&env, &db, 10).await;
    let other = create_sale(&env, &db, 10).await;
    // Another sale's backlog waits in the shared order queue (no worker runs).
    let backlog: Vec<_> = (1..=5)
        .map(|u| message(format!("{}-b{u}", env.id), other.id, u))
        .collect();
    publish(&env.config, &backlog).await;
    let mut redis = env.redis().await;

    let report = reconcile::reconcile(&env.config, &db, &mut redis, mine.id, opts(5_000))
        .await
        .expect("nothing of this sale is in flight");
    assert_eq!((report.stock, report.buyers), (10, 0));
    assert_eq!(
        queue_depth(&env.config, &env.config.amqp.queue).await,
        5,
        "the other sale's backlog is still queued"
    );
    let stock: i64 = redis.get(env.keys().sale(mine.id).stock()).await.unwrap();
    assert_eq!(stock, 10, "the sale is open again");

    // One admission of this sale in flight: the reconcile waits for it.
    admit(&env, mine.id, 7).await;
    let err = reconcile::reconcile(&env.config, &db, &mut redis, mine.id, opts(2_000))
        .await
        .expect_err("its own message is still queued");
    assert!(matches!(err, ReconcileError::NotQuiet(_)), "{err}");

    // A worker drains the queue; the reconcile then counts the order.
    let worker = InProcessWorker::start(&env.config).await;
    let report = reconcile::reconcile(&env.config, &db, &mut redis, mine.id, opts(30_000))
        .await
        .expect("its message was consumed");
    worker.stop().await;
    assert_eq!((report.stock, report.buyers, report.released), (9, 1, 0));
    assert_eq!(stock_left(&db, mine.id).await, 9);
    env.cleanup().await;
}
