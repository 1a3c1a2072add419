//! The order publisher against the real RabbitMQ. Each test has its own
//! exchange and queues (TestEnv). Broker failures are simulated without
//! touching the shared broker: by closing the publisher's own connection,
//! by deleting the test's own exchange (the broker then closes the channel),
//! and by a loopback TCP proxy that stops forwarding the broker's replies
//! (a hung broker / half-open connection).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use seckill_contracts::amqp_topology;
use seckill_contracts::config::AmqpConfig;
use seckill_contracts::testkit::TestEnv;
use seckill_contracts::OrderMessage;
use seckill_gateway::publisher::{OrderPublisher, PublishError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CLOSE_DELAY_MS: u64 = 60_000;

fn order(env: &TestEnv, i: u64) -> OrderMessage {
    OrderMessage::new(format!("{}-{i}", env.id), 7, i, 1_700_000_000_000)
}

async fn admin_channel(config: &AmqpConfig) -> (Connection, Channel) {
    let conn = Connection::connect(&config.url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be reachable for integration tests");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

async fn queue_len(conn: &Connection, queue: &str) -> u32 {
    // A fresh channel: a passive declare of a missing queue closes it.
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("queue {queue}: {e}"))
    .message_count()
}

/// Takes (and acks) every message currently in `queue`.
async fn drain(ch: &Channel, queue: &str) -> Vec<lapin::message::Delivery> {
    let mut out = Vec::new();
    while let Some(msg) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic_get")
    {
        out.push(msg.delivery);
    }
    out
}

/// Publishes until one succeeds (the publisher reconnects in the
/// background); returns how many attempts failed before it.
async fn publish_until_ok(publisher: &OrderPublisher, msg: &OrderMessage, within: Duration) -> u32 {
    let deadline = Instant::now() + within;
    let mut failures = 0;
    loop {
        match publisher.publish(msg).await {
            Ok(()) => return failures,
            Err(e) => {
                failures += 1;
                assert!(
                    Instant::now() < deadline,
                    "publisher did not recover within {within:?}; last error: {e}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_publishes_all_confirmed_and_enqueued() {
    let env = TestEnv::new().await;
    let config = env.config.amqp.clone();
    let publisher = Arc::new(
        OrderPublisher::connect(&config, CLOSE_DELAY_MS)
            .await
            .expect("connect"),
    );
    assert!(publisher.is_connected());

    let messages: Vec<OrderMessage> = (0..1_000).map(|i| order(&env, i)).collect();
    let started = Instant::now();
    let tasks: Vec<_> = messages
        .iter()
        .cloned()
        .map(|msg| {
            let publisher = publisher.clone();
            tokio::spawn(async move { publisher.publish(&msg).await })
        })
        .collect();
    let mut failures = Vec::new();
    for task in tasks {
        if let Err(e) = task.await.expect("publish task panicked") {
            failures.push(e.to_string());
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "published and confirmed 1000 messages concurrently in {:.1} ms ({:.0} msg/s)",
        elapsed.as_secs_f64() * 1e3,
        1_000.0 / elapsed.as_secs_f64()
    );
    assert!(failures.is_empty(), "failed publishes: {failures:?}");

    let (conn, ch) = admin_channel(&config).await;
    assert_eq!(queue_len(&conn, &config.queue).await, 1_000);
    assert_eq!(queue_len(&conn, &config.dead_letter_queue).await, 0);

    let deliveries = drain(&ch, &config.queue).await;
    assert_eq!(deliveries.len(), 1_000);
    let mut seen = HashSet::new();
    for delivery in &deliveries {
        let body = OrderMessage::from_json(&delivery.data).expect("body is an order message");
        let props = &delivery.properties;
        assert_eq!(
            props.message_id().as_ref().map(|s| s.as_str()),
            Some(body.message_id.as_str()),
            "AMQP message_id matches the body"
        );
        assert_eq!(*props.delivery_mode(), Some(2), "persistent");
        assert_eq!(
            props.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(delivery.exchange.as_str(), config.exchange);
        assert_eq!(
            delivery.routing_key.as_str(),
            amqp_topology::order_routing_key(&config)
        );
        assert!(seen.insert(body.message_id.clone()), "duplicate {body:?}");
        let sent = &messages[body.user_id as usize];
        assert_eq!(&body, sent, "body round-trips");
    }
    let _ = conn.close(200, "done".into()).await;
    drop(publisher);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_publish_is_returned_and_nothing_is_enqueued() {
    let env = TestEnv::new().await;
    let config = env.config.amqp.clone();
    let publisher = Arc::new(
        OrderPublisher::connect(&config, CLOSE_DELAY_MS)
            .await
            .expect("connect"),
    );
    // Remove the only queue bound for the order routing key.
    let (conn, ch) = admin_channel(&config).await;
    ch.queue_delete(config.queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete order queue");

    let err = publisher.publish(&order(&env, 0)).await.unwrap_err();
    assert!(matches!(err, PublishError::Returned), "got {err:?}");

    // Many at once: every one is reported, none is mistaken for a success.
    let tasks: Vec<_> = (1..=50)
        .map(|i| {
            let publisher = publisher.clone();
            let msg = order(&env, i);
            tokio::spawn(async move { publisher.publish(&msg).await })
        })
        .collect();
    for task in tasks {
        let result = task.await.unwrap();
        assert!(
            matches!(result, Err(PublishError::Returned)),
            "got {result:?}"
        );
    }
    // Returns are not connection failures: the link stays up.
    assert!(publisher.is_connected());

    // Nothing went anywhere: recreate the queue, it is empty, and so is the DLQ.
    amqp_topology::declare(&ch, &config, CLOSE_DELAY_MS)
        .await
        .expect("redeclare");
    assert_eq!(queue_len(&conn, &config.queue).await, 0);
    assert_eq!(queue_len(&conn, &config.dead_letter_queue).await, 0);

    // Routable again: the same publisher succeeds without reconnecting.
    publisher
        .publish(&order(&env, 99))
        .await
        .expect("routable publish");
    assert_eq!(queue_len(&conn, &config.queue).await, 1);
    let _ = conn.close(200, "done".into()).await;
    drop(publisher);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_connection_fails_fast_then_reconnects() {
    let env = TestEnv::new().await;
    let config = env.config.amqp.clone();
    let publisher = Arc::new(
        OrderPublisher::connect(&config, CLOSE_DELAY_MS)
            .await
            .expect("connect"),
    );
    publisher
        .publish(&order(&env, 0))
        .await
        .expect("first publish");

    publisher.close_for_test().await;
    assert!(!publisher.is_connected());
    let started = Instant::now();
    let err = publisher.publish(&order(&env, 1)).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, PublishError::Connection(_)), "got {err:?}");
    assert!(
        took < Duration::from_millis(500),
        "did not fail fast: {took:?}"
    );

    // Concurrent publishers during the outage: none hangs or panics, and
    // they do not each start a reconnect storm.
    let started = Instant::now();
    let tasks: Vec<_> = (100..200)
        .map(|i| {
            let publisher = publisher.clone();
            let msg = order(&env, i);
            tokio::spawn(async move { publisher.publish(&msg).await })
        })
        .collect();
    let mut enqueued = 1; // message 0
    for task in tasks {
        match task.await.expect("no panic") {
            Ok(()) => enqueued += 1,
            Err(PublishError::Connection(_)) => {}
            Err(e) => panic!("unexpected error during reconnect: {e:?}"),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "publishes during the outage took {:?}",
        started.elapsed()
    );

    let failed_before_recovery =
        publish_until_ok(&publisher, &order(&env, 2), Duration::from_secs(10)).await;
    enqueued += 1;
    eprintln!("recovered after {failed_before_recovery} more failed publishes");
    assert!(publisher.is_connected());
    publisher
        .publish(&order(&env, 3))
        .await
        .expect("after reconnect");
    enqueued += 1;

    let (conn, _ch) = admin_channel(&config).await;
    assert_eq!(queue_len(&conn, &config.queue).await, enqueued);
    let _ = conn.close(200, "done".into()).await;
    drop(publisher);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_closed_channel_is_replaced_and_topology_redeclared() {
    let env = TestEnv::new().await;
    let config = env.config.amqp.clone();
    let publisher = OrderPublisher::connect(&config, CLOSE_DELAY_MS)
        .await
        .expect("connect");
    // Publishing to a missing exchange makes the broker close the channel
    // (404 NOT_FOUND): a real broker-side failure of the publisher's link.
    let (conn, ch) = admin_channel(&config).await;
    ch.exchange_delete(
        config.exchange.as_str().into(),
        ExchangeDeleteOptions::default(),
    )
    .await
    .expect("delete exchange");

    let started = Instant::now();
    let err = publisher.publish(&order(&env, 0)).await.unwrap_err();
    assert!(matches!(err, PublishError::Connection(_)), "got {err:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1_000),
        "channel failure was not reported promptly: {:?}",
        started.elapsed()
    );

    // The reconnect redeclares the exchange and its binding.
    publish_until_ok(&publisher, &order(&env, 1), Duration::from_secs(10)).await;
    assert_eq!(queue_len(&conn, &config.queue).await, 1);
    let _ = conn.close(200, "done".into()).await;
    drop(publisher);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_broker_times_out_and_the_link_is_replaced() {
    let env = TestEnv::new().await;
    let mut config = env.config.amqp.clone();
    let proxy = FreezingProxy::start(&config.url).await;
    config.url = proxy.url.clone();
    config.confirm_timeout_ms = 300;
    let publisher = OrderPublisher::connect(&config, CLOSE_DELAY_MS)
        .await
        .expect("connect through proxy");
    publisher
        .publish(&order(&env, 0))
        .await
        .expect("healthy publish");

    // The broker's replies stop arriving: the confirm can never come.
    proxy.freeze_existing();
    let started = Instant::now();
    let err = publisher.publish(&order(&env, 1)).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, PublishError::Timeout), "got {err:?}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(2_000),
        "timeout after {took:?}, configured 300 ms"
    );

    // Nothing was confirmed while waiting, so the link is considered stalled
    // and replaced; the new connection (not frozen) works.
    publish_until_ok(&publisher, &order(&env, 2), Duration::from_secs(10)).await;
    assert!(publisher.is_connected());
    drop(publisher);
    env.cleanup().await;
}

/// A loopback TCP proxy to the broker whose existing connections can be
/// frozen: bytes from the broker are then held back (never delivered, never
/// corrupted), exactly like a hung broker or a half-open connection. New
/// connections are forwarded normally.
struct FreezingProxy {
    url: String,
    frozen: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl FreezingProxy {
    async fn start(broker_url: &str) -> FreezingProxy {
        let uri: lapin::uri::AMQPUri = broker_url.parse().expect("AMQP url");
        let upstream = format!("{}:{}", uri.authority.host, uri.authority.port);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = format!(
            "amqp://{}:{}@127.0.0.1:{port}/{}",
            uri.authority.userinfo.username,
            uri.authority.userinfo.password,
            uri.vhost.replace('/', "%2f")
        );
        let frozen: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let flags = frozen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let flag = Arc::new(AtomicBool::new(false));
                flags.lock().unwrap().push(flag.clone());
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        while flag.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        let n = match server_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        while flag.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FreezingProxy { url, frozen }
    }

    /// Holds back the broker's bytes on every connection opened so far.
    fn freeze_existing(&self) {
        for flag in self.frozen.lock().unwrap().iter() {
            flag.store(true, Ordering::SeqCst);
        }
    }
}
