//! The gateway's sale-event subscription moves off a dead node: with the
//! first seed of a cluster config unreachable, the subscriber goes to the
//! next node and sold-out notices published there reach the gateway. (A
//! subscription pinned to its first seed stopped hearing sold-out and
//! reopen notices for as long as that node was down.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use seckill_contracts::config::RedisConfig;
use seckill_contracts::redis_client::RedisConn;
use seckill_contracts::sale_events::{self, SaleEvent, SaleEventKind};
use seckill_contracts::testkit::{free_addr, TestEnv};
use seckill_gateway::sale_directory::SaleDirectory;

#[tokio::test]
async fn the_subscriber_leaves_a_dead_seed_for_the_next_node() {
    let env = TestEnv::new().await;
    let keys = env.keys();
    let seeds = RedisConfig {
        cluster: true,
        url: format!("redis://{}/", free_addr()),
        cluster_nodes: vec![env.config.redis.url.clone()],
        ..env.config.redis.clone()
    };
    let directory = Arc::new(SaleDirectory::new(
        keys.clone(),
        Duration::from_secs(1),
        Duration::from_secs(60),
    ));
    let follower = tokio::spawn(directory.clone().follow(seeds));

    let mut publisher = RedisConn::connect(&env.config.redis).await.unwrap();
    let event = SaleEvent {
        sale_id: 42,
        kind: SaleEventKind::SoldOut,
    };
    let started = Instant::now();
    while !directory.is_sold_out(42) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the notice never arrived: the subscriber is stuck on the dead seed"
        );
        sale_events::publish(&mut publisher, &keys, event)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each notice is stamped by its publisher, so the receiver can tell how
    // long notices take to reach it.
    let delays = seckill_gateway::metrics::SALE_EVENT_DELAY.with_label_values(&["sold_out"]);
    assert!(delays.get_sample_count() >= 1);
    assert!(
        delays.get_sample_sum() < 10.0,
        "{}",
        delays.get_sample_sum()
    );
    follower.abort();
    env.cleanup().await;
}

/// At a sell-out every request in flight learns of it at once; the gateway
/// announces it once, and again only after the sale reopened.
#[tokio::test]
async fn a_sold_out_mark_already_held_is_not_announced_again() {
    let env = TestEnv::new().await;
    let (directory, mut listener) = directory_and_listener(&env).await;
    let conn = RedisConn::connect(&env.config.redis).await.unwrap();
    let announce = |kind| {
        let (directory, mut conn) = (directory.clone(), conn.clone());
        async move {
            directory
                .announce(&mut conn, SaleEvent { sale_id: 9, kind })
                .await
                .unwrap()
        }
    };

    futures::future::join_all((0..20).map(|_| announce(SaleEventKind::SoldOut))).await;
    assert!(directory.is_sold_out(9));
    announce(SaleEventKind::Reopened).await;
    assert!(!directory.is_sold_out(9));
    announce(SaleEventKind::SoldOut).await;

    let mut heard = Vec::new();
    let mut messages = listener.on_message();
    while let Ok(Some(msg)) =
        tokio::time::timeout(Duration::from_millis(500), messages.next()).await
    {
        let notice = sale_events::Stamped::from_json(msg.get_payload_bytes()).unwrap();
        heard.push(notice.event.kind);
    }
    assert_eq!(
        heard,
        [
            SaleEventKind::SoldOut,
            SaleEventKind::Reopened,
            SaleEventKind::SoldOut
        ]
    );
    env.cleanup().await;
}

/// A connection that fails the test when used: the gateway's shared
/// connection (queued behind every request of a rush) must not carry the
/// notices once the sale-events thread runs.
struct MustNotBeUsed;

impl redis::aio::ConnectionLike for MustNotBeUsed {
    fn req_packed_command<'a>(
        &'a mut self,
        _: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        panic!("a notice went out on the shared connection")
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        _: &'a redis::Pipeline,
        _: usize,
        _: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        panic!("a notice went out on the shared connection")
    }
    fn get_db(&self) -> i64 {
        0
    }
}

/// With the sale-events thread running, a gateway's own notices go out
/// through it, stamped when they were announced.
#[tokio::test]
async fn announced_notices_go_out_through_the_sale_events_thread() {
    let env = TestEnv::new().await;
    let (directory, mut listener) = directory_and_listener(&env).await;
    directory
        .clone()
        .follow_on_own_thread(env.config.redis.clone());

    let before = seckill_contracts::clock::unix_ms();
    let event = SaleEvent {
        sale_id: 11,
        kind: SaleEventKind::Reopened,
    };
    directory.announce(&mut MustNotBeUsed, event).await.unwrap();
    let mut messages = listener.on_message();
    let msg = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .expect("the notice went out")
        .unwrap();
    let notice = sale_events::Stamped::from_json(msg.get_payload_bytes()).unwrap();
    assert_eq!(notice.event, event);
    assert!(notice.published_at_ms.is_some_and(|at| at >= before));
    env.cleanup().await;
}

/// A fresh directory for `env`'s deployment, and a subscriber to its sale
/// events channel (what every gateway would hear).
async fn directory_and_listener(env: &TestEnv) -> (Arc<SaleDirectory>, redis::aio::PubSub) {
    let keys = env.keys();
    let directory = Arc::new(SaleDirectory::new(
        keys.clone(),
        Duration::from_secs(1),
        Duration::from_secs(60),
    ));
    let client = redis::Client::open(env.config.redis.url.as_str()).unwrap();
    let mut listener = client.get_async_pubsub().await.unwrap();
    listener
        .subscribe(keys.sale_events_channel())
        .await
        .unwrap();
    (directory, listener)
}
