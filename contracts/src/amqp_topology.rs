//! The RabbitMQ topology of the order pipeline, declared the same way by
//! every process that touches it.
//!
//! RabbitMQ refuses (`406 PRECONDITION_FAILED`, closing the channel) a
//! redeclare of a queue with different arguments, so the gateway (publisher)
//! and the order workers (consumers) must not each build their own argument
//! tables. Both call [`declare`] with the deployment's [`AmqpConfig`] and the
//! same close delay ([`close_delay_ms`]), and the declaration is idempotent:
//! whoever starts first creates the objects, the others confirm them.
//!
//! How an order flows through what is declared here:
//!
//! ```text
//! gateway ──publish(routing key = queue name)──▶ exchange (direct, durable)
//!                                                  │
//!                                                  ▼
//!                                   order queue (durable; quorum if configured)
//!                                     │ consumed by the order workers
//!                                     │ rejected / over the delivery limit
//!                                     ▼
//!            dead-letter exchange (direct) ──▶ dead-letter queue (poison messages)
//!
//! worker ──publish(default exchange)──▶ close delay queue (x-message-ttl = close delay)
//!                                         │ expires, dead-lettered via "" exchange
//!                                         ▼
//!                                       close queue ──▶ timeout closer (worker)
//!
//! wallet relay ──publish(default exchange)──▶ payment queue ──▶ api (payment.mode = message)
//! api relay    ──publish(default exchange)──▶ refund queue  ──▶ wallet
//! ```
//!
//! Delivery limits: with `quorum = true` the broker counts deliveries and
//! dead-letters a message once it exceeds `x-delivery-limit`. Classic queues
//! cannot count deliveries, so with `quorum = false` there is no
//! `x-delivery-limit`; the worker enforces `delivery_limit` itself (from the
//! `redelivered` flag and the `x-death` header / its own attempt count) and
//! rejects the message without requeue, which dead-letters it the same way.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::config::{AmqpConfig, WorkerConfig};

/// The largest queue TTL RabbitMQ accepts (2^32 - 1 ms, about 49.7 days);
/// larger close delays are clamped to it rather than failing the declare.
pub const MAX_QUEUE_TTL_MS: u64 = u32::MAX as u64;

/// Declares, idempotently, the whole order topology:
///
/// * `config.exchange`: durable direct exchange the gateway publishes to;
/// * `config.queue`: durable order queue bound to it with routing key =
///   queue name ([`order_routing_key`]), with `x-dead-letter-exchange` →
///   `config.dead_letter_exchange` (routing key `config.dead_letter_queue`)
///   and, with `config.quorum`, `x-queue-type = quorum` and
///   `x-delivery-limit = config.delivery_limit` (classic queues cannot count
///   deliveries: the worker enforces the limit itself, see the module docs);
/// * `config.dead_letter_exchange` (durable, direct) and
///   `config.dead_letter_queue` bound to it, where poison messages wait for
///   an operator;
/// * `config.close_delay_queue`: durable, `x-message-ttl = close_delay_ms`
///   (clamped to [`MAX_QUEUE_TTL_MS`]), dead-lettering through the default
///   exchange (`""`) with routing key `config.close_queue`. A fixed queue TTL
///   (not a per-message expiration) keeps expiry in FIFO order, so an
///   expired message is never stuck behind a longer-lived one;
/// * `config.close_queue`: durable, consumed by the timeout closer;
/// * `config.payment_queue`, `config.refund_queue`: durable, the
///   reliable-message payment mode's two directions.
///
/// With `quorum = true` every queue is a quorum queue (replicated where a
/// cluster exists, SPEC §6); otherwise every queue is an explicitly classic
/// durable queue. Every process must pass the same `close_delay_ms`
/// (use [`close_delay_ms`]), or the second declare fails with
/// `PRECONDITION_FAILED`, which is the broker telling an operator that two
/// deployments disagree.
pub async fn declare(
    channel: &Channel,
    config: &AmqpConfig,
    close_delay_ms: u64,
) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            name(&config.exchange)?,
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            name(&config.dead_letter_exchange)?,
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;

    channel
        .queue_declare(
            name(&config.dead_letter_queue)?,
            QueueDeclareOptions::durable(),
            plain_queue_arguments(config),
        )
        .await?;
    channel
        .queue_bind(
            name(&config.dead_letter_queue)?,
            name(&config.dead_letter_exchange)?,
            name(&config.dead_letter_queue)?,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    channel
        .queue_declare(
            name(&config.queue)?,
            QueueDeclareOptions::durable(),
            order_queue_arguments(config),
        )
        .await?;
    channel
        .queue_bind(
            name(&config.queue)?,
            name(&config.exchange)?,
            name(order_routing_key(config))?,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    for plain in [
        &config.close_queue,
        &config.payment_queue,
        &config.refund_queue,
    ] {
        channel
            .queue_declare(
                name(plain)?,
                QueueDeclareOptions::durable(),
                plain_queue_arguments(config),
            )
            .await?;
    }
    channel
        .queue_declare(
            name(&config.close_delay_queue)?,
            QueueDeclareOptions::durable(),
            close_delay_queue_arguments(config, close_delay_ms),
        )
        .await?;
    Ok(())
}

/// The routing key orders are published with: the order queue's name, which
/// is also its binding key on the direct exchange. Publishers use this rather
/// than repeating the rule so a rename cannot leave messages unroutable.
pub fn order_routing_key(config: &AmqpConfig) -> &str {
    &config.queue
}

/// The close delay every process passes to [`declare`]: the unpaid-order
/// timeout of SPEC §3 (`worker.order_timeout_secs`) in milliseconds. The
/// gateway and the workers both derive it from the one configuration file
/// through this function, so their declarations are identical.
pub fn close_delay_ms(worker: &WorkerConfig) -> u64 {
    worker.order_timeout_secs.saturating_mul(1_000)
}

/// A configured name as an AMQP short string. AMQP caps names at 255
/// bytes; a longer configured name is refused as invalid input instead of
/// panicking inside the conversion.
fn name(s: &str) -> Result<ShortString, lapin::Error> {
    ShortString::try_new(s).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("AMQP name `{s}` is not usable: {e}"),
        )
        .into()
    })
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// `x-queue-type` for every queue: explicit even for classic queues, so a
/// vhost whose default queue type was changed cannot silently make the
/// declarations of two processes differ.
fn queue_type(config: &AmqpConfig) -> &'static str {
    if config.quorum {
        "quorum"
    } else {
        "classic"
    }
}

/// Arguments of the DLQ, the close queue and the payment queues: only
/// the queue type.
fn plain_queue_arguments(config: &AmqpConfig) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text(queue_type(config)));
    args
}

/// Arguments of the order queue: dead-lettering, and the delivery limit
/// where the broker can enforce it (quorum queues only).
fn order_queue_arguments(config: &AmqpConfig) -> FieldTable {
    let mut args = plain_queue_arguments(config);
    args.insert(
        "x-dead-letter-exchange".into(),
        text(&config.dead_letter_exchange),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        text(&config.dead_letter_queue),
    );
    if config.quorum {
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(config.delivery_limit)),
        );
    }
    args
}

/// Arguments of the close delay queue: a fixed TTL, then dead-lettering
/// through the default exchange straight into the close queue.
fn close_delay_queue_arguments(config: &AmqpConfig, close_delay_ms: u64) -> FieldTable {
    let mut args = plain_queue_arguments(config);
    let ttl = close_delay_ms.min(MAX_QUEUE_TTL_MS);
    // Lossless: clamped to u32::MAX above.
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl as i64));
    args.insert("x-dead-letter-exchange".into(), text(""));
    args.insert(
        "x-dead-letter-routing-key".into(),
        text(&config.close_queue),
    );
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(args: &'a FieldTable, key: &str) -> Option<&'a AMQPValue> {
        args.inner().get(&ShortString::from(key))
    }

    #[test]
    fn routing_key_is_the_queue_name() {
        let config = AmqpConfig::default();
        assert_eq!(order_routing_key(&config), config.queue);
    }

    #[test]
    fn classic_order_queue_has_no_delivery_limit() {
        let config = AmqpConfig {
            quorum: false,
            ..AmqpConfig::default()
        };
        let args = order_queue_arguments(&config);
        assert_eq!(get(&args, "x-queue-type"), Some(&text("classic")));
        assert_eq!(
            get(&args, "x-dead-letter-exchange"),
            Some(&text(&config.dead_letter_exchange))
        );
        assert_eq!(get(&args, "x-delivery-limit"), None);
    }

    #[test]
    fn quorum_order_queue_counts_deliveries() {
        let config = AmqpConfig {
            quorum: true,
            delivery_limit: 7,
            ..AmqpConfig::default()
        };
        let args = order_queue_arguments(&config);
        assert_eq!(get(&args, "x-queue-type"), Some(&text("quorum")));
        assert_eq!(
            get(&args, "x-delivery-limit"),
            Some(&AMQPValue::LongLongInt(7))
        );
    }

    #[test]
    fn close_delay_queue_dead_letters_into_the_close_queue() {
        let config = AmqpConfig::default();
        let args = close_delay_queue_arguments(&config, 1_800_000);
        assert_eq!(
            get(&args, "x-message-ttl"),
            Some(&AMQPValue::LongLongInt(1_800_000))
        );
        assert_eq!(get(&args, "x-dead-letter-exchange"), Some(&text("")));
        assert_eq!(
            get(&args, "x-dead-letter-routing-key"),
            Some(&text(&config.close_queue))
        );
        let clamped = close_delay_queue_arguments(&config, u64::MAX);
        assert_eq!(
            get(&clamped, "x-message-ttl"),
            Some(&AMQPValue::LongLongInt(MAX_QUEUE_TTL_MS as i64))
        );
    }

    #[test]
    fn close_delay_follows_the_order_timeout() {
        let worker = WorkerConfig {
            order_timeout_secs: 1_800,
            ..WorkerConfig::default()
        };
        assert_eq!(close_delay_ms(&worker), 1_800_000);
    }
}
