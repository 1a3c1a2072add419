//! The dead-letter queue, for operators: list what is parked there and
//! replay it into the order queue (the backend of `seckillctl dlq
//! list|replay`).
//!
//! Listing takes messages with `basic.get` without acking and closes the
//! channel afterwards, which puts every one of them back; nothing is
//! consumed. Replaying republishes a message to the order exchange (with a
//! publisher confirm) and only then acks it from the DLQ, so a crash in
//! between duplicates a message rather than losing it, which the worker
//! tolerates (it is idempotent per `message_id`). The worker clears a
//! message's attempt counter when it dead-letters it, so a replayed message
//! gets the full delivery limit again.

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use seckill_contracts::amqp_topology;
use seckill_contracts::brokers;
use seckill_contracts::config::Config;
use serde::Serialize;

/// One parked message.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DlqEntry {
    /// The AMQP message id (the admission's request id), if any.
    pub message_id: Option<String>,
    /// The body as text (lossy for non-UTF-8 bodies).
    pub body: String,
    /// Why it was dead-lettered (`rejected`, `delivery_limit`, ...), from
    /// the broker's `x-death` header.
    pub reason: Option<String>,
    /// How often it was dead-lettered from its queue.
    pub deaths: Option<i64>,
}

async fn open(config: &Config) -> lapin::Result<(Connection, Channel)> {
    let props = ConnectionProperties::default().with_connection_name("seckill dlq".into());
    let (conn, _) = brokers::connect(&config.amqp, props).await?;
    let channel = conn.create_channel().await?;
    amqp_topology::declare(
        &channel,
        &config.amqp,
        amqp_topology::close_delay_ms(&config.worker),
    )
    .await?;
    Ok((conn, channel))
}

fn entry(delivery: &lapin::message::Delivery) -> DlqEntry {
    let props = &delivery.properties;
    let mut reason = None;
    let mut deaths = None;
    if let Some(headers) = props.headers() {
        if let Some(AMQPValue::FieldArray(list)) =
            headers.inner().get(&ShortString::from("x-death"))
        {
            if let Some(AMQPValue::FieldTable(first)) = list.as_slice().first() {
                let t = first.inner();
                reason = match t.get(&ShortString::from("reason")) {
                    Some(AMQPValue::LongString(s)) => Some(s.to_string()),
                    Some(AMQPValue::ShortString(s)) => Some(s.to_string()),
                    _ => None,
                };
                deaths = match t.get(&ShortString::from("count")) {
                    Some(AMQPValue::LongLongInt(n)) => Some(*n),
                    Some(AMQPValue::LongInt(n)) => Some(i64::from(*n)),
                    Some(AMQPValue::LongUInt(n)) => Some(i64::from(*n)),
                    _ => None,
                };
            }
        }
    }
    DlqEntry {
        message_id: props.message_id().as_ref().map(|s| s.to_string()),
        body: String::from_utf8_lossy(&delivery.data).into_owned(),
        reason,
        deaths,
    }
}

/// Up to `limit` parked messages, oldest first; the queue is left as it was.
pub async fn list(config: &Config, limit: usize) -> lapin::Result<Vec<DlqEntry>> {
    let (conn, channel) = open(config).await?;
    let mut out = Vec::new();
    while out.len() < limit {
        match channel
            .basic_get(
                config.amqp.dead_letter_queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await?
        {
            Some(m) => out.push(entry(&m.delivery)),
            None => break,
        }
    }
    // Unacked gets go back to the queue when the channel closes.
    let _ = channel.close(200, "dlq listed".into()).await;
    let _ = conn.close(200, "dlq listed".into()).await;
    Ok(out)
}

/// Moves up to `limit` parked messages back into the order queue (only
/// those whose message id is in `only`, when given; the others stay).
/// Returns the replayed entries.
pub async fn replay(
    config: &Config,
    limit: usize,
    only: Option<&[String]>,
) -> lapin::Result<Vec<DlqEntry>> {
    let (conn, channel) = open(config).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut replayed = Vec::new();
    let mut seen = 0usize;
    while replayed.len() < limit {
        let Some(m) = channel
            .basic_get(
                config.amqp.dead_letter_queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await?
        else {
            break;
        };
        seen += 1;
        let e = entry(&m.delivery);
        if let Some(only) = only {
            let wanted = e
                .message_id
                .as_ref()
                .is_some_and(|id| only.iter().any(|o| o == id));
            if !wanted {
                // Left unacked: back into the DLQ when the channel closes.
                if seen > 100_000 {
                    break;
                }
                continue;
            }
        }
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        if let Some(id) = m.delivery.properties.message_id() {
            props = props.with_message_id(id.clone());
        }
        let confirm = channel
            .basic_publish(
                config.amqp.exchange.as_str().into(),
                amqp_topology::order_routing_key(&config.amqp).into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &m.delivery.data,
                props,
            )
            .await?
            .await?;
        if !confirm.is_ack() || confirm.take_message().is_some() {
            tracing::warn!(message_id = ?e.message_id, "replay not accepted by the broker; left in the DLQ");
            break;
        }
        m.delivery.acker.ack(BasicAckOptions::default()).await?;
        replayed.push(e);
    }
    let _ = channel.close(200, "dlq replayed".into()).await;
    let _ = conn.close(200, "dlq replayed".into()).await;
    Ok(replayed)
}
