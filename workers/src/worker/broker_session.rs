//! How a worker's consumers (orders, closes) hold on to RabbitMQ: one
//! connection per session, the shared topology declared on it, a manual-ack
//! consumer with a prefetch window, and a reconnect with growing backoff
//! whenever the link breaks.
//!
//! ```text
//! reconnecting(session) ──▶ session(stop) ─ open_consumer(channel, queue, prefetch)
//!        ▲                        │            = declare topology + basic.qos + basic.consume
//!        └── backoff(failures) ◀──┘ Err (broker gone)      Ok (stop requested) ──▶ return
//! ```
//!
//! Both consumers declare the whole topology, not just their own queue, so
//! whichever process starts first makes the broker ready for every other.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use seckill_contracts::amqp_topology;
use tokio::sync::watch;

use super::consumer::WorkerContext;

/// Runs `session` until it returns `Ok` (a requested stop) or `stop` turns
/// true; after an `Err` (the broker link broke) waits `backoff(n)` for the
/// n-th consecutive failure and opens a new session.
pub(crate) async fn reconnecting<F, Fut>(
    what: &'static str,
    mut stop: watch::Receiver<bool>,
    backoff: fn(u32) -> Duration,
    mut session: F,
) where
    F: FnMut(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut failures = 0u32;
    loop {
        if *stop.borrow() {
            return;
        }
        match session(stop.clone()).await {
            Ok(()) => return,
            Err(e) => {
                let wait = backoff(failures);
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, retry_in = ?wait, "{what} session ended");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Declares the shared topology on `channel`, limits unacked deliveries to
/// `prefetch` and starts a manual-ack consumer on `queue`.
pub(crate) async fn open_consumer(
    ctx: &WorkerContext,
    channel: &Channel,
    queue: &str,
    prefetch: u16,
) -> lapin::Result<Consumer> {
    let amqp = &ctx.config.amqp;
    amqp_topology::declare(
        channel,
        amqp,
        amqp_topology::close_delay_ms(&ctx.config.worker),
    )
    .await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// The consumer's next delivery, or `Ok(None)` once `stop` turns true (a
/// stop wins over a delivery that arrived at the same moment, which then
/// stays unacked and is redelivered). A failed stream or a consumer the
/// broker cancelled is an `Err`: the session ends and reconnects.
pub(crate) async fn next_delivery(
    consumer: &mut Consumer,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<Option<Delivery>> {
    let next = tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => return Ok(None),
        d = consumer.next() => d,
    };
    match next {
        Some(d) => Ok(Some(d?)),
        None => Err(anyhow::anyhow!("the broker cancelled the consumer")),
    }
}
