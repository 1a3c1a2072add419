//! Poison messages: malformed ones are dead-lettered at once, one whose
//! processing always fails is dead-lettered after the delivery limit, and
//! the good messages around them all commit.

#[path = "worker_support.rs"]
mod support;

use std::time::Duration;

use seckill_contracts::testkit::TestEnv;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_go_to_the_dlq_and_good_ones_commit() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let sale = create_sale(&env, &db, 100).await;
    let mut config = env.config.clone();
    config.amqp.delivery_limit = 3;

    let mut bodies: Vec<(String, Vec<u8>)> = Vec::new();
    for u in 1..=20u64 {
        let m = message(format!("good-{u}"), sale.id, u);
        bodies.push((m.message_id.clone(), m.to_json()));
    }
    // Not JSON at all.
    bodies.push(("bad-json".into(), b"{not json".to_vec()));
    // A version this build does not read.
    let mut future = message("future", sale.id, 500);
    future.version = 99;
    bodies.push(("future".into(), future.to_json()));
    // Valid JSON whose request id MySQL refuses (too long for the column):
    // every attempt fails the same way.
    let long = message("x".repeat(100), sale.id, 501);
    bodies.push((long.message_id.clone(), long.to_json()));
    for u in 21..=40u64 {
        let m = message(format!("good-{u}"), sale.id, u);
        bodies.push((m.message_id.clone(), m.to_json()));
    }
    publish_raw(&config, &bodies).await;

    let w = InProcessWorker::start(&config).await;
    let done = wait_for(Duration::from_secs(60), || async {
        queue_depth(&config, &config.amqp.dead_letter_queue).await >= 3
            && count(&db, "SELECT COUNT(*) FROM orders").await >= 40
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.stop().await;
    assert!(
        done,
        "dlq {} orders {}",
        queue_depth(&config, &config.amqp.dead_letter_queue).await,
        count(&db, "SELECT COUNT(*) FROM orders").await
    );
    assert_eq!(count(&db, "SELECT COUNT(*) FROM orders").await, 40);
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM failed_admissions").await,
        0
    );
    assert_eq!(stock_left(&db, sale.id).await, 60);
    assert_eq!(
        queue_depth(&config, &config.amqp.dead_letter_queue).await,
        3
    );
    assert_eq!(queue_depth(&config, &config.amqp.queue).await, 0);

    // The DLQ can be listed without consuming it...
    let listed = seckill_workers::worker::dlq::list(&config, 10)
        .await
        .unwrap();
    let mut ids: Vec<String> = listed.iter().filter_map(|e| e.message_id.clone()).collect();
    ids.sort();
    assert_eq!(
        ids,
        vec!["bad-json".to_string(), "future".into(), "x".repeat(100)]
    );
    assert!(
        listed
            .iter()
            .all(|e| e.reason.as_deref() == Some("rejected")),
        "{listed:?}"
    );
    assert_eq!(
        queue_depth(&config, &config.amqp.dead_letter_queue).await,
        3
    );
    // ...and one message replayed into the order queue.
    let only = vec!["future".to_string()];
    let replayed = seckill_workers::worker::dlq::replay(&config, 10, Some(&only))
        .await
        .unwrap();
    assert_eq!(replayed.len(), 1);
    assert_eq!(
        queue_depth(&config, &config.amqp.dead_letter_queue).await,
        2
    );
    assert_eq!(queue_depth(&config, &config.amqp.queue).await, 1);

    // The same through the ops CLI: `seckillctl dlq list` and `replay --id`.
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_seckillctl"))
            .args(args)
            .envs(env.env_vars())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listed = ctl(&["dlq", "list"]);
    let listed: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.iter().any(|e| e["message_id"] == "bad-json"));
    let replayed = ctl(&["dlq", "replay", "--id", "bad-json"]);
    assert_eq!(replayed.lines().count(), 1, "{replayed}");
    assert_eq!(
        queue_depth(&config, &config.amqp.dead_letter_queue).await,
        1
    );
    assert_eq!(queue_depth(&config, &config.amqp.queue).await, 2);
    env.cleanup().await;
}
