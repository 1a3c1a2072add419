//! The order publisher fails over to another broker node: it publishes
//! through node A (a link to the real broker that the test can cut, as if
//! the node died), A dies mid-stream, the publisher reconnects to node B
//! (`amqp.failover_urls`), and every publish that was confirmed is in the
//! queue, none of them twice.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use lapin::options::BasicGetOptions;
use lapin::{Connection, ConnectionProperties};
use seckill_contracts::testkit::TestEnv;
use seckill_contracts::OrderMessage;
use seckill_gateway::publisher::OrderPublisher;
use support::stack::CuttableLink;

const CLOSE_DELAY_MS: u64 = 60_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_fails_over_to_the_next_and_nothing_confirmed_is_lost() {
    let env = TestEnv::new().await;
    let node_a = CuttableLink::start(&env.config.amqp.url).await;
    let mut config = env.config.amqp.clone();
    config.url = node_a.url.clone();
    config.failover_urls = vec![env.config.amqp.url.clone()];
    let publisher = OrderPublisher::connect(&config, CLOSE_DELAY_MS)
        .await
        .expect("connect through node A");

    let order = |i: u64| OrderMessage::new(format!("{}-{i}", env.id), 7, i, 1_700_000_000_000);
    let mut confirmed = HashSet::new();
    for i in 0..50 {
        publisher.publish(&order(i)).await.expect("node A is up");
        confirmed.insert(order(i).message_id);
    }

    node_a.cut();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut i = 50;
    while confirmed.len() < 100 {
        assert!(Instant::now() < deadline, "never failed over to node B");
        if publisher.publish(&order(i)).await.is_ok() {
            confirmed.insert(order(i).message_id);
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        i += 1;
    }

    let conn = Connection::connect(&env.config.amqp.url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut queued = Vec::new();
    while let Some(msg) = ch
        .basic_get(
            config.queue.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let m: OrderMessage = serde_json::from_slice(&msg.delivery.data).unwrap();
        queued.push(m.message_id);
    }
    let unique: HashSet<_> = queued.iter().cloned().collect();
    assert_eq!(unique.len(), queued.len(), "no order is queued twice");
    assert!(
        confirmed.is_subset(&unique),
        "every confirmed publish is queued: {} of {} missing",
        confirmed.difference(&unique).count(),
        confirmed.len()
    );
    env.cleanup().await;
}
