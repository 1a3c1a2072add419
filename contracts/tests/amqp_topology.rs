//! The order topology against the real RabbitMQ: `declare` is idempotent,
//! the queue types are what the configuration says, and the dead-letter and
//! delayed-close wiring actually moves messages. Each test has its own queue
//! names (TestEnv), deleted when the env drops.
#![cfg(feature = "testkit")]

use std::time::{Duration, Instant};

use lapin::options::{
    BasicGetOptions, BasicNackOptions, BasicPublishOptions, BasicRejectOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use seckill_contracts::amqp_topology::{self, declare, order_routing_key};
use seckill_contracts::config::AmqpConfig;
use seckill_contracts::testkit::TestEnv;

async fn connect(config: &AmqpConfig) -> Connection {
    Connection::connect(&config.url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be reachable for integration tests")
}

async fn confirmed_channel(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");
    ch
}

async fn publish(ch: &Channel, exchange: &str, routing_key: &str, body: &[u8]) {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "not acked: {confirm:?}");
    assert!(confirm.take_message().is_none(), "message was unroutable");
}

/// Polls `queue` with basic.get until a message arrives or `timeout` passes.
async fn get_within(
    ch: &Channel,
    queue: &str,
    timeout: Duration,
) -> Option<lapin::message::Delivery> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic_get");
        if let Some(msg) = got {
            return Some(msg.delivery);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// The arguments each queue is expected to carry (classic flavour): written
/// out here independently of the implementation, as the contract.
fn expected_classic_arguments(config: &AmqpConfig, queue: &str, ttl_ms: i64) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("classic"));
    if queue == config.queue {
        args.insert(
            "x-dead-letter-exchange".into(),
            text(&config.dead_letter_exchange),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            text(&config.dead_letter_queue),
        );
    } else if queue == config.close_delay_queue {
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl_ms));
        args.insert("x-dead-letter-exchange".into(), text(""));
        args.insert(
            "x-dead-letter-routing-key".into(),
            text(&config.close_queue),
        );
    }
    args
}

/// Redeclares `queue` on a throwaway channel (a refusal, 406, closes the
/// channel); true when the broker accepted it as equivalent.
async fn redeclare_accepted(
    conn: &Connection,
    queue: &str,
    durable: bool,
    args: FieldTable,
) -> bool {
    let ch = conn.create_channel().await.expect("channel");
    let options = QueueDeclareOptions {
        durable,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(queue.into(), options, args).await.is_ok()
}

#[tokio::test]
async fn declare_twice_is_idempotent_and_classic_when_not_quorum() {
    let env = TestEnv::new().await;
    let mut config = env.config.amqp.clone();
    config.quorum = false;
    let conn = connect(&config).await;
    let ch = conn.create_channel().await.unwrap();

    declare(&ch, &config, 60_000).await.expect("first declare");
    declare(&ch, &config, 60_000).await.expect("second declare");
    // A second connection (another process) declares the same thing.
    let other = connect(&config).await;
    let other_ch = other.create_channel().await.unwrap();
    declare(&other_ch, &config, 60_000)
        .await
        .expect("declare from a second connection");

    for queue in [
        &config.queue,
        &config.dead_letter_queue,
        &config.close_delay_queue,
        &config.close_queue,
    ] {
        let passive = conn.create_channel().await.unwrap();
        passive
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("{queue} must exist: {e}"));
        // Exactly the expected durable classic queue: the same declaration
        // is accepted, a transient or quorum one is refused.
        let expected = expected_classic_arguments(&config, queue, 60_000);
        assert!(
            redeclare_accepted(&conn, queue, true, expected.clone()).await,
            "{queue} must be durable, classic, with the contract's arguments"
        );
        assert!(
            !redeclare_accepted(&conn, queue, false, expected.clone()).await,
            "{queue} must be durable"
        );
        let mut quorum = expected;
        quorum.insert("x-queue-type".into(), text("quorum"));
        assert!(
            !redeclare_accepted(&conn, queue, true, quorum).await,
            "{queue} must be a classic queue"
        );
    }

    // A different close delay is a different declaration: refused, so two
    // processes with different order timeouts notice at start-up.
    let ch2 = conn.create_channel().await.unwrap();
    assert!(declare(&ch2, &config, 61_000).await.is_err());

    let _ = other.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
    env.cleanup().await;
}

#[tokio::test]
async fn rejected_order_goes_to_the_dead_letter_queue() {
    let env = TestEnv::new().await;
    let config = env.config.amqp.clone();
    let conn = connect(&config).await;
    let ch = confirmed_channel(&conn).await;
    declare(&ch, &config, 60_000).await.unwrap();

    publish(&ch, &config.exchange, order_routing_key(&config), b"poison").await;
    let msg = get_within(&ch, &config.queue, Duration::from_secs(5))
        .await
        .expect("order message routed to the order queue");
    msg.acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();

    let dead = get_within(&ch, &config.dead_letter_queue, Duration::from_secs(5))
        .await
        .expect("rejected message dead-lettered");
    assert_eq!(dead.data, b"poison");
    let headers = dead.properties.headers().clone().unwrap_or_default();
    assert!(
        headers.contains_key("x-death"),
        "x-death header: {headers:?}"
    );
    let _ = conn.close(200, "done".into()).await;
    env.cleanup().await;
}

#[tokio::test]
async fn close_delay_queue_expires_into_the_close_queue() {
    let env = TestEnv::new().await;
    let config = env.config.amqp.clone();
    let conn = connect(&config).await;
    let ch = confirmed_channel(&conn).await;
    declare(&ch, &config, 300).await.unwrap();

    let started = Instant::now();
    publish(&ch, "", &config.close_delay_queue, b"order 42").await;
    let closed = get_within(&ch, &config.close_queue, Duration::from_secs(10))
        .await
        .expect("expired message reaches the close queue");
    let waited = started.elapsed();
    assert_eq!(closed.data, b"order 42");
    assert!(
        waited >= Duration::from_millis(250),
        "arrived after {waited:?}, before the TTL"
    );
    let _ = conn.close(200, "done".into()).await;
    env.cleanup().await;
}

#[tokio::test]
async fn quorum_queues_enforce_the_delivery_limit() {
    let env = TestEnv::new().await;
    let mut config = env.config.amqp.clone();
    config.quorum = true;
    config.delivery_limit = 1;
    let conn = connect(&config).await;
    let ch = confirmed_channel(&conn).await;
    declare(&ch, &config, 60_000).await.expect("first declare");
    declare(&ch, &config, 60_000).await.expect("second declare");
    let mut classic = expected_classic_arguments(&config, &config.queue, 0);
    classic.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(1));
    let mut quorum = classic.clone();
    quorum.insert("x-queue-type".into(), text("quorum"));
    assert!(
        redeclare_accepted(&conn, &config.queue, true, quorum).await,
        "order queue must be a quorum queue with x-delivery-limit"
    );
    assert!(
        !redeclare_accepted(&conn, &config.queue, true, classic).await,
        "order queue must not be classic"
    );

    publish(&ch, &config.exchange, order_routing_key(&config), b"flaky").await;
    // Nack with requeue until the broker gives up on the message.
    let mut deliveries = 0;
    while let Some(msg) = get_within(&ch, &config.queue, Duration::from_millis(500)).await {
        deliveries += 1;
        assert!(deliveries <= 5, "delivery limit not enforced");
        msg.acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .unwrap();
    }
    assert!(deliveries >= 2, "delivered {deliveries} times");
    let dead = get_within(&ch, &config.dead_letter_queue, Duration::from_secs(5))
        .await
        .expect("over-delivered message dead-lettered");
    assert_eq!(dead.data, b"flaky");
    let _ = conn.close(200, "done".into()).await;
    env.cleanup().await;
}

#[test]
fn close_delay_is_derived_from_the_order_timeout() {
    let worker = seckill_contracts::config::WorkerConfig::default();
    assert_eq!(
        amqp_topology::close_delay_ms(&worker),
        worker.order_timeout_secs * 1_000
    );
}
