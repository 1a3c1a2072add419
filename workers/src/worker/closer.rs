//! Timeout close of unpaid orders (SPEC §3: `unpaid` → `closed` after
//! `worker.order_timeout_secs`, 30 minutes by default), the prompt path.
//!
//! ```text
//! consumer commits a batch ──schedule()──▶ close delay queue (x-message-ttl = timeout)
//!                          (one message: the batch's order ids)
//!                                               │ expires; RabbitMQ dead-letters it
//!                                               ▼
//!                    close queue ──consume()──▶ orders::close_expired_one (guarded)
//! ```
//!
//! A fixed queue TTL (not a per-message one) keeps expiry in FIFO order, so
//! one long-lived message never holds back the ones behind it
//! ([`seckill_contracts::amqp_topology`]). The close itself is the guarded,
//! idempotent one of [`crate::orders`], so a close message delivered twice,
//! a close racing a payment, or the same order closed by the sweeper at the
//! same moment all end with exactly one state change and one unit of stock
//! returned.
//!
//! This path is the fast one, not the only one: a schedule lost between the
//! order's commit and the publish (a worker killed right then, the broker
//! down) is caught by the sweeper ([`super::sweeper`]), which closes every
//! overdue unpaid order under its lock.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions, BasicRejectOptions};
use lapin::{BasicProperties, Channel, ConnectionProperties};
use seckill_contracts::brokers;
use seckill_contracts::config::AmqpConfig;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::backoff::Backoff;
use super::broker_session;
use super::context::WorkerContext;
use super::metrics::METRICS;
use crate::orders;

/// Version of [`CloseMessage`]; a message of another version is refused
/// (the sweeper still closes its orders when they are overdue).
pub const CLOSE_MESSAGE_VERSION: u32 = 2;
/// Close messages handled at once per process: each holds up to a batch of
/// orders, closed one single-row transaction at a time.
const CLOSE_PREFETCH: u16 = 4;
/// Reconnects, and pauses before a failed close message is handed back.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));

/// "Close these orders if they are still unpaid": what waits in the close
/// delay queue for the order timeout. One message per committed batch, not
/// per order: during a sell-out the broker shares the machine with the
/// admission path, and a hundred times fewer publishes and confirms leave
/// it that much more room (the bench's hot-sale p99 is set in that second).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseMessage {
    pub version: u32,
    pub orders: Vec<OrderToClose>,
}

/// One order of a [`CloseMessage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderToClose {
    pub order_id: String,
    pub sale_id: u64,
}

/// Publishes one [`CloseMessage`] for the committed `orders` of a batch to
/// the close delay queue (persistent, through the default exchange) and
/// waits for the broker's confirm; `channel` must be in confirm mode.
/// Returns whether it was confirmed. A failure is the caller's to log: the
/// sweeper closes whatever was not scheduled.
pub async fn schedule(
    channel: &Channel,
    config: &AmqpConfig,
    orders: &[(String, u64)],
) -> Result<bool, lapin::Error> {
    let Some((first, _)) = orders.first() else {
        return Ok(true);
    };
    let body = serde_json::to_vec(&CloseMessage {
        version: CLOSE_MESSAGE_VERSION,
        orders: orders
            .iter()
            .map(|(order_id, sale_id)| OrderToClose {
                order_id: order_id.clone(),
                sale_id: *sale_id,
            })
            .collect(),
    })
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    let confirm = channel
        .basic_publish(
            "".into(),
            config.close_delay_queue.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(format!("close-{first}").as_str().into()),
        )
        .await?;
    Ok(confirm.await?.is_ack())
}

/// Consumes the close queue until `stop` turns true, reconnecting with
/// backoff after a broker error.
pub async fn consume(ctx: Arc<WorkerContext>, stop: watch::Receiver<bool>) {
    broker_session::reconnecting("close consumer", stop, BACKOFF, |mut stop| {
        let ctx = ctx.clone();
        async move { session(&ctx, &mut stop).await }
    })
    .await
}

async fn session(ctx: &Arc<WorkerContext>, stop: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
    let amqp = &ctx.config.amqp;
    let props =
        ConnectionProperties::default().with_connection_name("seckill-worker closer".into());
    let (conn, _) = brokers::connect(amqp, props).await?;
    let channel = conn.create_channel().await?;
    let mut deliveries =
        broker_session::open_consumer(ctx, &channel, &amqp.close_queue, CLOSE_PREFETCH).await?;
    tracing::info!(queue = %amqp.close_queue, "consuming order closes");
    let mut failures = 0u32;
    let result = loop {
        let delivery = match broker_session::next_delivery(&mut deliveries, stop).await {
            Ok(Some(d)) => d,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.context("close consumer")),
        };
        let message = match serde_json::from_slice::<CloseMessage>(&delivery.data) {
            Ok(m) if m.version == CLOSE_MESSAGE_VERSION => m,
            other => {
                tracing::warn!(parsed = ?other.ok(), "dropping a malformed close message");
                delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await?;
                continue;
            }
        };
        match close_all(ctx, &message).await {
            Ok(closed) => {
                failures = 0;
                METRICS
                    .orders_closed
                    .with_label_values(&["delayed"])
                    .inc_by(closed);
                tracing::debug!(
                    orders = message.orders.len(),
                    closed,
                    "close message handled"
                );
                delivery.acker.ack(BasicAckOptions::default()).await?;
            }
            Err(e) => {
                // MySQL or Redis trouble: hand it back after a pause; the
                // close is idempotent, so the orders already closed stay
                // closed once, and the retry does the rest.
                let wait = BACKOFF.delay(failures);
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, retry_in = ?wait, "closing orders failed; requeueing");
                tokio::time::sleep(wait).await;
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await?;
            }
        }
    };
    let _ = channel.close(200, "closer stopping".into()).await;
    let _ = conn.close(200, "closer stopping".into()).await;
    result
}

/// Closes every order of `message` that is still unpaid and due; returns
/// how many this call closed.
async fn close_all(ctx: &WorkerContext, message: &CloseMessage) -> Result<u64, orders::OrderError> {
    let mut redis = ctx.redis.clone();
    let mut closed = 0;
    for order in &message.orders {
        let outcome =
            orders::close_expired_one(&ctx.db, &mut redis, &ctx.keys, &order.order_id).await?;
        if outcome.closed() {
            closed += 1;
        }
    }
    Ok(closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_message_round_trips_and_names_its_version() {
        let m = CloseMessage {
            version: CLOSE_MESSAGE_VERSION,
            orders: vec![OrderToClose {
                order_id: "0192-abc".into(),
                sale_id: 7,
            }],
        };
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"version\":2"), "{json}");
        assert_eq!(serde_json::from_str::<CloseMessage>(&json).unwrap(), m);
        assert!(serde_json::from_str::<CloseMessage>("{\"order_id\":1}").is_err());
        // The per-order shape of version 1 is refused, not misread.
        let v1 = "{\"version\":1,\"order_id\":\"a\",\"sale_id\":7}";
        assert!(serde_json::from_str::<CloseMessage>(v1).is_err());
    }
}
