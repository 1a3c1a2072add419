//! Broker failover against the real RabbitMQ: a dead first node is
//! skipped, the node that answered is tried first next time, and when no
//! node answers the caller gets the error rather than a hang.
//!
//! One test function: the "answered last" node is process-wide state, so
//! the steps must not run in parallel with each other.

use lapin::ConnectionProperties;
use seckill_contracts::brokers;
use seckill_contracts::config::AmqpConfig;
use seckill_contracts::testkit::{free_addr, TestEnv};

fn dead_url() -> String {
    format!("amqp://guest:guest@{}/%2f", free_addr())
}

#[tokio::test]
async fn fails_over_sticks_to_the_node_that_answered_and_reports_when_none_does() {
    let env = TestEnv::new().await;
    let real = env.config.amqp.url.clone();
    let props = ConnectionProperties::default;

    let first_dead = AmqpConfig {
        url: dead_url(),
        failover_urls: vec![real.clone()],
        ..env.config.amqp.clone()
    };
    let (conn, node) = brokers::connect(&first_dead, props()).await.unwrap();
    assert_eq!(node, 1, "the dead first node is skipped");
    assert!(conn.status().connected());
    let channel = conn.create_channel().await.unwrap();
    assert!(channel.status().connected(), "a usable connection");
    conn.close(200, "test done".into()).await.unwrap();

    // Both nodes alive now: the one that answered last goes first, so a
    // fleet that failed over does not go back to knocking on the other.
    let both_alive = AmqpConfig {
        url: real.clone(),
        failover_urls: vec![real.replace("127.0.0.1", "localhost")],
        ..env.config.amqp.clone()
    };
    let (conn, node) = brokers::connect(&both_alive, props()).await.unwrap();
    assert_eq!(node, 1, "sticky to the node that answered last");
    conn.close(200, "test done".into()).await.unwrap();

    let none = AmqpConfig {
        url: dead_url(),
        failover_urls: vec![dead_url(), dead_url()],
        ..env.config.amqp.clone()
    };
    let started = std::time::Instant::now();
    assert!(brokers::connect(&none, props()).await.is_err());
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert!(
        env.config.amqp.broker_urls().len() == 1,
        "no failover nodes by default"
    );
}
