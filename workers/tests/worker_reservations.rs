//! A gateway rollback and the worker can never both count one admission:
//! the real `lua/redis/admit.lua` reserves, `release.lua` rolls back, and
//! the worker claims before writing (real Redis, RabbitMQ, MariaDB).

#[path = "worker_support.rs"]
mod support;

use std::time::Duration;

use redis::AsyncCommands;
use seckill_contracts::testkit::TestEnv;
use seckill_workers::worker::reservations;
use support::*;

const ADMIT: &str = include_str!("../../lua/redis/admit.lua");
const RELEASE: &str = seckill_contracts::scripts::RELEASE;

/// Admits `user` as the gateway would; returns the request id.
async fn admit(env: &TestEnv, sale: u64, user: u64) -> String {
    let k = env.keys().sale(sale);
    let mut r = env.redis().await;
    let path = format!("{:032x}", user);
    let _: () = r.set_ex(k.path(user), &path, 60).await.unwrap();
    let rid = format!("{}-{user}", env.id);
    let reply: Vec<redis::Value> = redis::Script::new(ADMIT)
        .key(k.info())
        .key(k.stock())
        .key(k.buyers())
        .key(k.reservations())
        .key(k.path(user))
        .key(k.limit(user))
        .arg(user)
        .arg(&path)
        .arg(&rid)
        .arg(5)
        .arg(1000)
        .invoke_async(&mut r)
        .await
        .unwrap();
    let outcome: String = redis::from_redis_value(reply[0].clone()).unwrap();
    assert_eq!(outcome, "admitted");
    rid
}

async fn release(env: &TestEnv, sale: u64, user: u64, rid: &str, min_age_ms: u64) -> i64 {
    let k = env.keys().sale(sale);
    let mut r = env.redis().await;
    redis::Script::new(RELEASE)
        .key(k.reservations())
        .key(k.stock())
        .key(k.buyers())
        .key(k.released())
        .arg(user)
        .arg(rid)
        .arg(3600)
        .arg(min_age_ms)
        .invoke_async(&mut r)
        .await
        .unwrap()
}

#[tokio::test]
async fn late_message_of_a_rolled_back_admission_is_refused_and_a_claimed_one_stands() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let sale = create_sale(&env, &db, 10).await;
    let keys = env.keys();
    let k = keys.sale(sale.id);
    let rolled_back = admit(&env, sale.id, 1).await;
    let claimed = admit(&env, sale.id, 2).await;
    let normal = admit(&env, sale.id, 3).await;
    let mut r = env.redis().await;
    let stock: i64 = r.get(k.stock()).await.unwrap();
    assert_eq!(stock, 7);

    // Too young for the sweeper's timeout: untouched.
    assert_eq!(release(&env, sale.id, 1, &rolled_back, 60_000).await, 0);
    // The gateway's rollback (publish not confirmed): unit back, id remembered.
    assert_eq!(release(&env, sale.id, 1, &rolled_back, 0).await, 1);
    assert_eq!(
        release(&env, sale.id, 1, &rolled_back, 0).await,
        0,
        "idempotent"
    );
    let stock: i64 = r.get(k.stock()).await.unwrap();
    assert_eq!(stock, 8);

    // A worker claims user 2's reservation first: the rollback must refuse.
    let msg2 = message(&claimed, sale.id, 2);
    let gone = reservations::claim(&mut r, &keys, std::slice::from_ref(&msg2))
        .await
        .unwrap();
    assert!(gone.is_empty());
    assert_eq!(release(&env, sale.id, 2, &claimed, 0).await, -1);

    // All three messages reach the worker anyway (the broker kept #1).
    let msgs = vec![
        message(&rolled_back, sale.id, 1),
        msg2,
        message(&normal, sale.id, 3),
    ];
    publish(&env.config, &msgs).await;
    let w = InProcessWorker::start(&env.config).await;
    let done = wait_for(Duration::from_secs(30), || async {
        settled(&db).await >= 3
    })
    .await;
    w.stop().await;
    assert!(done, "all three settled");

    let orders = count(&db, "SELECT COUNT(*) FROM orders").await;
    assert_eq!(orders, 2, "the rolled-back admission made no order");
    let reason: String =
        sqlx::query_scalar("SELECT reason FROM failed_admissions WHERE request_id = ?")
            .bind(&rolled_back)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(reason, "released");
    // Invariant 4 when quiet: Redis stock + unclosed orders = stock.
    let stock: i64 = r.get(k.stock()).await.unwrap();
    assert_eq!(stock + orders, 10);
    assert_eq!(stock_left(&db, sale.id).await, 8);
    let resv: i64 = r.hlen(k.reservations()).await.unwrap();
    assert_eq!(resv, 0, "no stuck reservation");
    let result: String = r.get(k.result(1)).await.unwrap();
    assert!(result.contains("failed"), "{result}");
    env.cleanup().await;
}

/// A Redis failover can lose an admission's writes (admit.lua's decrement,
/// buyer marker and reservation, all in one script) while its message
/// reached the broker. The worker writes the order anyway (MySQL's guards
/// decide), and then takes the unit from the counter, once: Redis stock +
/// unclosed orders = stock again, with the buyer marked. A redelivery of
/// the same message takes nothing more.
#[tokio::test]
async fn an_order_whose_admission_redis_lost_takes_its_unit_once() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let sale = create_sale(&env, &db, 10).await;
    let k = env.keys().sale(sale.id);
    let kept = admit(&env, sale.id, 1).await;
    let lost = admit(&env, sale.id, 2).await;
    // The failover: user 2's admission never reached the new master.
    let mut r = env.redis().await;
    let _: () = r.incr(k.stock(), 1).await.unwrap();
    let _: () = r.hdel(k.reservations(), 2).await.unwrap();
    let _: () = r.srem(k.buyers(), 2).await.unwrap();
    let stock: i64 = r.get(k.stock()).await.unwrap();
    assert_eq!(stock, 9, "Redis counts only user 1's unit now");

    let msgs = vec![message(&kept, sale.id, 1), message(&lost, sale.id, 2)];
    publish(&env.config, &msgs).await;
    // The same message of the lost admission once more (a redelivery).
    publish(&env.config, &msgs[1..]).await;
    let w = InProcessWorker::start(&env.config).await;
    let done = wait_for(Duration::from_secs(30), || async {
        settled(&db).await >= 2 && queue_depth(&env.config, &env.config.amqp.queue).await == 0
    })
    .await;
    w.stop().await;
    assert!(done, "both settled");

    let orders = count(&db, "SELECT COUNT(*) FROM orders").await;
    assert_eq!(orders, 2);
    let stock: i64 = r.get(k.stock()).await.unwrap();
    assert_eq!(stock + orders, 10, "invariant 4: the lost unit taken once");
    assert_eq!(stock_left(&db, sale.id).await, 8);
    let marked: bool = r.sismember(k.buyers(), 2).await.unwrap();
    assert!(marked, "the buyer with an order is marked again");
    let resv: i64 = r.hlen(k.reservations()).await.unwrap();
    assert_eq!(resv, 0, "no stuck reservation");
    env.cleanup().await;
}
