//! The order worker against the real MariaDB, Redis and RabbitMQ: exact
//! stock under two concurrent workers, duplicates, the MySQL guard when
//! Redis is wrong, and the results/reservations it leaves in Redis.

#[path = "worker_support.rs"]
mod support;

use std::time::Duration;

use seckill_contracts::testkit::TestEnv;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_sell_exactly_the_stock() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let sale = create_sale(&env, &db, 1_000).await;
    let messages: Vec<_> = (1..=2_000u64)
        .map(|u| message(format!("req-{u}"), sale.id, u))
        .collect();
    publish(&env.config, &messages).await;

    let a = InProcessWorker::start(&env.config).await;
    let b = InProcessWorker::start(&env.config).await;
    let done = wait_for(Duration::from_secs(120), || async {
        settled(&db).await >= 2_000
    })
    .await;
    a.stop().await;
    b.stop().await;
    assert!(done, "only {} of 2000 settled", settled(&db).await);

    assert_eq!(count(&db, "SELECT COUNT(*) FROM orders").await, 1_000);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM failed_admissions WHERE reason = 'sold_out'"
        )
        .await,
        1_000
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM failed_admissions").await,
        1_000
    );
    assert_eq!(stock_left(&db, sale.id).await, 0);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM (SELECT user_id FROM orders GROUP BY user_id, sale_id \
             HAVING COUNT(*) > 1) d"
        )
        .await,
        0
    );
    // Orders carry the sale price, are unpaid and expire in the future.
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM orders WHERE amount_cents = 990 AND status = 'unpaid' \
             AND expires_at > created_at AND LENGTH(id) = 36"
        )
        .await,
        1_000
    );
    assert_eq!(queue_depth(&env.config, &env.config.amqp.queue).await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_10000_messages_with_duplicates_give_one_order_per_buyer() {
    const BUYERS: u64 = 4_000;
    const SECOND_TRIES: u64 = 2_000;
    let env = TestEnv::new().await;
    let db = env.db().await;
    let sale = create_sale(&env, &db, 5_000).await;
    let mut messages = Vec::new();
    // 10,000 messages: 4,000 buyers, each request published twice, and
    // half of the buyers send a second request too.
    for u in 1..=BUYERS {
        messages.push(message(format!("req-{u}"), sale.id, u));
        messages.push(message(format!("req-{u}"), sale.id, u));
        if u <= SECOND_TRIES {
            messages.push(message(format!("again-{u}"), sale.id, u));
        }
    }
    assert_eq!(messages.len(), 10_000);
    publish(&env.config, &messages).await;
    let mut config = env.config.clone();
    config.worker.batch_size = 17; // batches straddle the duplicates
    let a = InProcessWorker::start(&config).await;
    let b = InProcessWorker::start(&config).await;
    let done = wait_for(Duration::from_secs(120), || async {
        settled(&db).await >= (BUYERS + SECOND_TRIES) as i64
            && queue_depth(&env.config, &env.config.amqp.queue).await == 0
    })
    .await;
    // Give the last acks a moment, then stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.stop().await;
    b.stop().await;
    assert!(done, "settled {}", settled(&db).await);
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM orders").await,
        BUYERS as i64
    );
    assert_eq!(
        count(&db, "SELECT COUNT(DISTINCT user_id) FROM orders").await,
        BUYERS as i64
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM failed_admissions WHERE reason = 'duplicate'"
        )
        .await,
        SECOND_TRIES as i64
    );
    assert_eq!(stock_left(&db, sale.id).await, 5_000 - BUYERS as i64);

    // Every buyer's poll shows their one order.
    let mut redis = env.redis().await;
    for u in [1u64, 77, 200] {
        let raw: String = redis::cmd("GET")
            .arg(env.keys().sale(sale.id).result(u))
            .query_async(&mut redis)
            .await
            .expect("result written");
        let v: serde_json::Value = serde_json::from_str(&raw).unwrap();
        let order: String = sqlx::query_scalar("SELECT id FROM orders WHERE user_id = ?")
            .bind(u)
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(v["status"], "success", "{raw}");
        assert_eq!(v["order_id"], order.as_str(), "{raw}");
    }
    env.cleanup().await;
}

/// Simulates the gateway's admission for `user`: stock decremented, buyer
/// marked, reservation recorded.
async fn admit(
    env: &TestEnv,
    redis: &mut redis::aio::MultiplexedConnection,
    sale: u64,
    user: u64,
    request: &str,
) {
    let k = env.keys().sale(sale);
    let _: () = redis::pipe()
        .cmd("DECR")
        .arg(k.stock())
        .ignore()
        .cmd("SADD")
        .arg(k.buyers())
        .arg(user)
        .ignore()
        .cmd("HSET")
        .arg(k.reservations())
        .arg(user)
        .arg(format!(
            "{request}:{}",
            chrono::Utc::now().timestamp_millis()
        ))
        .ignore()
        .query_async(redis)
        .await
        .expect("admit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_never_oversells_when_redis_is_wrong_and_results_settle() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let sale = create_sale(&env, &db, 10).await;
    let k = env.keys().sale(sale.id);
    let mut redis = env.redis().await;
    // Redis deliberately far too high.
    let _: () = redis::cmd("SET")
        .arg(k.stock())
        .arg(1_000)
        .query_async(&mut redis)
        .await
        .unwrap();
    let mut messages = Vec::new();
    for u in 1..=30u64 {
        let id = format!("req-{u}");
        admit(&env, &mut redis, sale.id, u, &id).await;
        messages.push(message(id, sale.id, u));
    }
    publish(&env.config, &messages).await;
    let w = InProcessWorker::start(&env.config).await;
    let done = wait_for(Duration::from_secs(60), || async {
        let hlen: i64 = redis::cmd("HLEN")
            .arg(k.reservations())
            .query_async(&mut env.redis().await)
            .await
            .unwrap();
        settled(&db).await >= 30 && hlen == 0
    })
    .await;
    w.stop().await;
    assert!(done, "settled {}", settled(&db).await);

    assert_eq!(count(&db, "SELECT COUNT(*) FROM orders").await, 10);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM failed_admissions WHERE reason = 'sold_out'"
        )
        .await,
        20
    );
    assert_eq!(stock_left(&db, sale.id).await, 0);

    // Results: 10 successes with their order ids, 20 failures.
    let mut successes = 0;
    for u in 1..=30u64 {
        let raw: String = redis::cmd("GET")
            .arg(k.result(u))
            .query_async(&mut redis)
            .await
            .expect("result written");
        let v: serde_json::Value = serde_json::from_str(&raw).unwrap();
        match v["status"].as_str() {
            Some("success") => {
                successes += 1;
                let order: String = sqlx::query_scalar("SELECT id FROM orders WHERE user_id = ?")
                    .bind(u)
                    .fetch_one(&db)
                    .await
                    .unwrap();
                assert_eq!(v["order_id"], order.as_str());
            }
            Some("failed") => assert_eq!(v["reason"], "sold_out", "{raw}"),
            other => panic!("unexpected result {other:?}: {raw}"),
        }
        let ttl: i64 = redis::cmd("TTL")
            .arg(k.result(u))
            .query_async(&mut redis)
            .await
            .unwrap();
        assert!(ttl > 3600, "result TTL {ttl}");
    }
    assert_eq!(successes, 10);
    // Reservations cleared; the 20 failed buyers released (stock back,
    // marker removed), the 10 buyers keep theirs.
    let buyers: i64 = redis::cmd("SCARD")
        .arg(k.buyers())
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(buyers, 10);
    let stock: i64 = redis::cmd("GET")
        .arg(k.stock())
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(stock, 1_000 - 30 + 20);

    // A redelivery of a settled failure changes nothing (no second release).
    publish(&env.config, &messages[25..]).await;
    let w = InProcessWorker::start(&env.config).await;
    let drained = wait_for(Duration::from_secs(30), || async {
        queue_depth(&env.config, &env.config.amqp.queue).await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.stop().await;
    assert!(drained);
    let stock_after: i64 = redis::cmd("GET")
        .arg(k.stock())
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(stock_after, stock);
    assert_eq!(settled(&db).await, 30);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_sale_is_an_explicit_failure() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    publish(&env.config, &[message("req-x", 999_999, 5)]).await;
    let w = InProcessWorker::start(&env.config).await;
    let done = wait_for(Duration::from_secs(30), || async {
        settled(&db).await >= 1
    })
    .await;
    w.stop().await;
    assert!(done);
    let reason: String =
        sqlx::query_scalar("SELECT reason FROM failed_admissions WHERE request_id = 'req-x'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(reason, "unknown_sale");
    env.cleanup().await;
}

#[tokio::test]
async fn settle_script_is_exact_and_idempotent() {
    use seckill_workers::statuses::FailReason;
    use seckill_workers::worker::order_writer::{Outcome, Settlement};
    use seckill_workers::worker::results;

    let env = TestEnv::new().await;
    let keys = env.keys();
    let k = keys.sale(7);
    let mut redis = env.redis().await;
    let _: () = redis::pipe()
        .cmd("SET")
        .arg(k.stock())
        .arg(50)
        .ignore()
        .cmd("SADD")
        .arg(k.buyers())
        .arg(&[1, 2, 3, 4])
        .ignore()
        .cmd("HSET")
        .arg(k.reservations())
        .arg(&[
            ("1", "r1:100"),
            ("2", "r2:100"),
            ("3", "r3b:100"),
            ("4", "other:100"),
        ])
        .ignore()
        .query_async(&mut redis)
        .await
        .unwrap();
    let outcome = |id: &str, user: u64, settlement: Settlement| Outcome {
        message: message(id, 7, user),
        settlement,
        already_settled: false,
    };
    let outcomes = vec![
        outcome(
            "r1",
            1,
            Settlement::Success {
                order_id: "o1".into(),
            },
        ),
        outcome(
            "r2",
            2,
            Settlement::Failed {
                reason: FailReason::SoldOut,
                existing_order: None,
            },
        ),
        outcome(
            "r3b",
            3,
            Settlement::Failed {
                reason: FailReason::Duplicate,
                existing_order: Some("o3".into()),
            },
        ),
        outcome(
            "r4",
            4,
            Settlement::Failed {
                reason: FailReason::SoldOut,
                existing_order: None,
            },
        ),
    ];
    // Twice: the second run must change nothing.
    for _ in 0..2 {
        results::publish(&mut redis, &keys, &outcomes)
            .await
            .unwrap();
        let stock: i64 = redis::cmd("GET")
            .arg(k.stock())
            .query_async(&mut redis)
            .await
            .unwrap();
        // r2 (released) and r3b (duplicate's own unit) give back one each.
        assert_eq!(stock, 52);
        let mut buyers: Vec<u64> = redis::cmd("SMEMBERS")
            .arg(k.buyers())
            .query_async(&mut redis)
            .await
            .unwrap();
        buyers.sort();
        assert_eq!(buyers, vec![1, 3, 4]);
        let resv: Vec<String> = redis::cmd("HKEYS")
            .arg(k.reservations())
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_eq!(
            resv,
            vec!["4".to_string()],
            "another request's reservation stays"
        );
        let get = |u: u64| redis::cmd("GET").arg(k.result(u)).clone();
        let r1: String = get(1).query_async(&mut redis).await.unwrap();
        assert_eq!(r1, r#"{"status":"success","order_id":"o1"}"#);
        let r2: String = get(2).query_async(&mut redis).await.unwrap();
        assert_eq!(r2, r#"{"status":"failed","reason":"sold_out"}"#);
        let r3: String = get(3).query_async(&mut redis).await.unwrap();
        assert_eq!(r3, r#"{"status":"success","order_id":"o3"}"#);
    }
    env.cleanup().await;
}

/// Peak shaving: with `worker.drain_orders_per_sec` a burst already in the
/// queue reaches MySQL over `burst / rate` seconds, not at once, and every
/// message still becomes its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paced_worker_spreads_a_burst_and_writes_every_order() {
    let mut env = TestEnv::new().await;
    env.config.worker.drain_orders_per_sec = 200;
    // 200 orders at 200 a second, at most 50 a batch: the last batch's
    // turn comes at least 750 ms after the first's (unpaced, the four
    // batches go within a few tens of milliseconds).
    let spread_ms = paced_burst_of_200(&env, "paced").await;
    assert!(
        spread_ms >= 700,
        "the burst reached MySQL within {spread_ms} ms"
    );
    assert_eq!(queue_depth(&env.config, &env.config.amqp.queue).await, 0);
    env.cleanup().await;
}

/// The pace is bounded: no order waits past
/// `worker.drain_pace_max_delay_ms` after its admission. At 20 orders a
/// second a burst of 200 would take 7.5 s to reach MySQL; with the bound
/// at 3 s the batches still at their turns then go at once, so the burst
/// is shaped while young and all written about 3 s after admission (a
/// little less after the worker's start).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paced_worker_holds_no_order_past_the_bound() {
    let mut env = TestEnv::new().await;
    env.config.worker.drain_orders_per_sec = 20;
    env.config.worker.drain_pace_max_delay_ms = 3_000;
    let spread_ms = paced_burst_of_200(&env, "bounded").await;
    assert!(
        spread_ms >= 1_000,
        "not paced: all written within {spread_ms} ms"
    );
    assert!(
        spread_ms <= 5_000,
        "the bound did not hold: the writes spread over {spread_ms} ms"
    );
    env.cleanup().await;
}

/// 200 orders of a fresh sale queued at once, then a worker (batches of
/// at most 50) started on them; checks each became its order and the
/// stock is gone, and returns how many milliseconds apart the first and
/// the last reached MySQL.
async fn paced_burst_of_200(env: &TestEnv, tag: &str) -> i64 {
    let mut config = env.config.clone();
    config.worker.batch_size = 50;
    let db = env.db().await;
    let sale = create_sale(env, &db, 200).await;
    let messages: Vec<_> = (1..=200u64)
        .map(|u| message(format!("{tag}-{u}"), sale.id, u))
        .collect();
    publish(&config, &messages).await;

    let worker = InProcessWorker::start(&config).await;
    let done = wait_for(Duration::from_secs(60), || async {
        settled(&db).await >= 200
    })
    .await;
    worker.stop().await;
    assert!(done, "only {} of 200 settled", settled(&db).await);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM orders").await, 200);
    assert_eq!(stock_left(&db, sale.id).await, 0);
    count(
        &db,
        "SELECT TIMESTAMPDIFF(MICROSECOND, MIN(created_at), MAX(created_at)) DIV 1000 FROM orders",
    )
    .await
}
