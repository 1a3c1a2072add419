//! Redelivery after a crash: the real `seckill-worker` binary is killed
//! with SIGKILL in the middle of the stream and restarted; every message
//! settles exactly once (no order lost, none duplicated, stock exact).

#[path = "worker_support.rs"]
mod support;

use std::time::Duration;

use seckill_contracts::testkit::{free_addr, wait_ok, Process, TestEnv};
use support::*;

fn spawn_worker(env: &TestEnv) -> (Process, std::net::SocketAddr) {
    let addr = free_addr();
    let mut vars = env.env_vars();
    vars.push(("SECKILL__WORKER__BATCH_SIZE".into(), "25".into()));
    vars.push(("SECKILL__WORKER__PREFETCH".into(), "200".into()));
    vars.push(("SECKILL__LOG__FILTER".into(), "warn".into()));
    let p = Process::spawn(
        env!("CARGO_BIN_EXE_seckill-worker"),
        &["--listen", &addr.to_string()],
        &vars,
    );
    (p, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_stream_then_restart_settles_every_message_once() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let total = 6_000u64;
    let stock = 5_000u32;
    let sale = create_sale(&env, &db, stock).await;
    let messages: Vec<_> = (1..=total)
        .map(|u| message(format!("req-{u}"), sale.id, u))
        .collect();
    publish(&env.config, &messages).await;

    let (first, addr) = spawn_worker(&env);
    assert!(
        wait_ok(&format!("http://{addr}/healthz"), Duration::from_secs(20)).await,
        "worker never became healthy"
    );
    // Wait for the stream to be well under way, then SIGKILL.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if settled(&db).await >= 300 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker made no progress"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.signal("KILL");
    let mut first = first;
    assert!(first.wait_exit(Duration::from_secs(10)).await.is_some());
    let at_kill = settled(&db).await;
    assert!(
        (at_kill as u64) < total,
        "the worker finished before it could be killed ({at_kill})"
    );

    let (mut second, addr) = spawn_worker(&env);
    assert!(wait_ok(&format!("http://{addr}/healthz"), Duration::from_secs(20)).await);
    let done = wait_for(Duration::from_secs(120), || async {
        settled(&db).await >= total as i64
            && queue_depth(&env.config, &env.config.amqp.queue).await == 0
    })
    .await;
    second.signal("TERM");
    assert!(second.wait_exit(Duration::from_secs(30)).await.is_some());
    assert!(done, "settled {} of {total}", settled(&db).await);

    assert_eq!(
        settled(&db).await,
        total as i64,
        "a message settled twice or was lost"
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM orders").await,
        i64::from(stock)
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM failed_admissions WHERE reason = 'sold_out'"
        )
        .await,
        total as i64 - i64::from(stock)
    );
    assert_eq!(stock_left(&db, sale.id).await, 0);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM (SELECT request_id FROM orders UNION ALL \
             SELECT request_id FROM failed_admissions) r"
        )
        .await,
        count(
            &db,
            "SELECT COUNT(DISTINCT request_id) FROM (SELECT request_id FROM orders UNION ALL \
             SELECT request_id FROM failed_admissions) r"
        )
        .await
    );
    // Every buyer has a result to poll.
    let mut redis = env.redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!(
            "{}:{{sale:{}}}:result:*",
            env.keys().prefix(),
            sale.id
        ))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(keys.len() as u64, total);
    env.cleanup().await;
}
