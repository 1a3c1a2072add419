//! The RabbitMQ side of the order worker: consume, batch, settle.
//!
//! A session connects and opens a manual-ack consumer with
//! `basic.qos(prefetch)` on the order queue (`broker_session`, which also
//! declares the shared topology and reconnects). Deliveries are collected into
//! batches of up to `worker.batch_size` messages, or whatever arrived within
//! `worker.batch_max_wait_ms` of the batch's first message, and each batch
//! is handled to the end before the next is collected:
//!
//! 1. malformed or unsupported-version messages are rejected without
//!    requeue, which dead-letters them (the order queue's
//!    `x-dead-letter-exchange`);
//! 2. the rest have their reservations claimed ([`reservations::claim`])
//!    and go through [`order_writer::write_batch`] (one transaction);
//! 3. after the commit, [`results::publish`] writes results and settles
//!    reservations in Redis;
//! 4. only then is every delivery of the batch acked (one ack per delivery:
//!    a `multiple` ack could cover a message whose delayed retry is still
//!    pending).
//!
//! Failures:
//!
//! * transient (database unreachable, deadlock, Redis down after commit):
//!   the write is retried in process a few times; then the batch is handed
//!   back (`nack`, requeue) after a backoff that grows while failures
//!   continue. These do not count against the delivery limit: a long MySQL
//!   outage must not send good orders to the DLQ;
//! * anything else (a value the schema refuses, ...): the batch is split and
//!   every message retried alone, so one poison message cannot hold back
//!   the others. A message that fails alone has its attempt counted in Redis
//!   (`<prefix>:worker:attempts:<message_id>`); below `amqp.delivery_limit`
//!   it is requeued after a backoff (without blocking the consumer), at the
//!   limit it is rejected into the DLQ. Classic queues cannot count
//!   deliveries themselves (see [`seckill_contracts::amqp_topology`]); with quorum queues the
//!   broker's `x-delivery-limit` applies as well.
//!
//! At-least-once delivery is safe because the writer is idempotent per
//! `message_id` and the settle script per reservation: a redelivery (after a
//! crash, a lost ack or a requeue) is acked without a second order and gets
//! its result written again.
//!
//! Shutdown: no new batch is started, the one in flight is finished and
//! acked, then the channel is closed, which hands every prefetched but
//! unhandled delivery back to the broker.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions, ConfirmSelectOptions};
use lapin::{Channel, Connection, ConnectionProperties};
use seckill_contracts::config::Config;
use seckill_contracts::keys::KeySchema;
use seckill_contracts::redis_client::RedisConn;
use seckill_contracts::OrderMessage;
use sqlx::MySqlPool;
use tokio::sync::watch;
use tokio::time::Instant;

use super::metrics::METRICS;
use super::order_writer::{self, Outcome, Settlement, WriteError, WriterConfig};
use super::{broker_session, closer, reservations, results};

/// In-process retries of a transient write before the batch is requeued.
const WRITE_TRIES: u32 = 3;
/// Backoff bounds for requeues and reconnects.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long an attempt counter outlives the message's last failure.
const ATTEMPTS_TTL_SECS: u64 = 24 * 3600;

/// What a consumer needs: configuration and the two stores.
pub struct WorkerContext {
    pub config: Config,
    pub db: MySqlPool,
    pub redis: RedisConn,
    pub keys: KeySchema,
    /// Consecutive transient failures; drives the requeue backoff.
    transient_failures: AtomicU32,
}

impl WorkerContext {
    pub fn new(config: Config, db: MySqlPool, redis: RedisConn) -> WorkerContext {
        let keys = KeySchema::new(config.redis.key_prefix.clone());
        WorkerContext {
            config,
            db,
            redis,
            keys,
            transient_failures: AtomicU32::new(0),
        }
    }

    fn writer_config(&self) -> WriterConfig {
        WriterConfig {
            order_timeout_secs: self.config.worker.order_timeout_secs,
        }
    }

    /// The Redis key counting failed attempts of one message.
    pub fn attempts_key(&self, message_id: &str) -> String {
        format!("{}:worker:attempts:{message_id}", self.keys.prefix())
    }
}

fn backoff(step: u32) -> Duration {
    let factor = 1u32 << step.min(10);
    (BACKOFF_MIN * factor).min(BACKOFF_MAX)
}

/// Consumes until `stop` turns true, reconnecting with backoff after any
/// broker error. Returns once the in-flight batch is settled.
pub async fn consume(ctx: Arc<WorkerContext>, stop: watch::Receiver<bool>, index: usize) {
    broker_session::reconnecting("order consumer", stop, backoff, |mut stop| {
        let ctx = ctx.clone();
        async move { session(&ctx, &mut stop, index).await }
    })
    .await
}

/// One connection: returns `Ok` on a requested stop, `Err` when the broker
/// link broke.
async fn session(
    ctx: &Arc<WorkerContext>,
    stop: &mut watch::Receiver<bool>,
    index: usize,
) -> anyhow::Result<()> {
    let amqp = &ctx.config.amqp;
    let worker = &ctx.config.worker;
    let props = ConnectionProperties::default()
        .with_connection_name(format!("seckill-worker consumer {index}").into());
    let conn = Connection::connect(&amqp.url, props).await?;
    let channel = conn.create_channel().await?;
    // Close messages go out on their own confirm-mode channel, so waiting
    // for their confirms never mixes with the consumer's acks.
    let closes = conn.create_channel().await?;
    closes
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut consumer =
        broker_session::open_consumer(ctx, &channel, &amqp.queue, worker.prefetch).await?;
    tracing::info!(queue = %amqp.queue, prefetch = worker.prefetch, batch = worker.batch_size, "consuming orders");

    let batch_size = worker.batch_size.max(1);
    let max_wait = Duration::from_millis(worker.batch_max_wait_ms);
    let result: anyhow::Result<()> = loop {
        let first = match broker_session::next_delivery(&mut consumer, stop).await {
            Ok(Some(d)) => d,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.context("order consumer")),
        };
        let mut batch = vec![first];
        let deadline = Instant::now() + max_wait;
        let mut stream_end = None;
        while batch.len() < batch_size {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(Ok(d))) => batch.push(d),
                Ok(Some(Err(e))) => {
                    stream_end = Some(anyhow::Error::from(e));
                    break;
                }
                Ok(None) => {
                    stream_end = Some(anyhow!("the broker cancelled the consumer"));
                    break;
                }
                Err(_) => break,
            }
        }
        if let Err(e) = handle_batch(ctx, &closes, batch).await {
            break Err(e.into());
        }
        if let Some(e) = stream_end {
            break Err(e);
        }
    };
    // Closing the channel returns every unacked delivery to the queue.
    let _ = channel.close(200, "order worker stopping".into()).await;
    let _ = conn.close(200, "order worker stopping".into()).await;
    result
}

/// Handles one batch to the end: every delivery is acked, rejected or
/// (possibly after a delay) requeued when this returns `Ok`.
pub async fn handle_batch(
    ctx: &Arc<WorkerContext>,
    closes: &Channel,
    batch: Vec<Delivery>,
) -> lapin::Result<()> {
    METRICS.consumed.inc_by(batch.len() as u64);
    let mut valid: Vec<(Delivery, OrderMessage)> = Vec::with_capacity(batch.len());
    for d in batch {
        match OrderMessage::from_json(&d.data) {
            Ok(m) => valid.push((d, m)),
            Err(e) => {
                tracing::warn!(error = %e, delivery_tag = d.delivery_tag, "dead-lettering a malformed order message");
                METRICS
                    .dead_lettered
                    .with_label_values(&["malformed"])
                    .inc();
                d.acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await?;
            }
        }
    }
    if valid.is_empty() {
        return Ok(());
    }
    let messages: Vec<OrderMessage> = valid.iter().map(|(_, m)| m.clone()).collect();
    match write(ctx, &messages).await {
        Ok(outcomes) => finish(ctx, closes, &valid, &outcomes).await,
        Err(e) if e.is_transient() => {
            let step = ctx.transient_failures.fetch_add(1, Ordering::Relaxed);
            let wait = backoff(step);
            tracing::warn!(error = %e, messages = valid.len(), retry_in = ?wait, "batch write failed; requeueing");
            tokio::time::sleep(wait).await;
            requeue_now(&valid, "database").await
        }
        Err(e) if valid.len() > 1 => {
            tracing::warn!(error = %e, messages = valid.len(), "batch write failed; retrying its messages one by one");
            for item in valid {
                handle_single(ctx, closes, item).await?;
            }
            Ok(())
        }
        Err(e) => match valid.pop() {
            Some(item) => failed_attempt(ctx, item, e).await,
            None => Ok(()),
        },
    }
}

/// One message in its own transaction (after its batch failed).
async fn handle_single(
    ctx: &Arc<WorkerContext>,
    closes: &Channel,
    item: (Delivery, OrderMessage),
) -> lapin::Result<()> {
    match write(ctx, std::slice::from_ref(&item.1)).await {
        Ok(outcomes) => finish(ctx, closes, std::slice::from_ref(&item), &outcomes).await,
        Err(e) if e.is_transient() => {
            let step = ctx.transient_failures.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff(step)).await;
            requeue_now(std::slice::from_ref(&item), "database").await
        }
        Err(e) => failed_attempt(ctx, item, e).await,
    }
}

/// Claims the reservations, then the batch write, each retried in process
/// while the error is transient.
async fn write(ctx: &WorkerContext, messages: &[OrderMessage]) -> Result<Vec<Outcome>, WriteError> {
    let mut redis = ctx.redis.clone();
    let mut tries = 0;
    let released = loop {
        match reservations::claim(&mut redis, &ctx.keys, messages).await {
            Ok(r) => break r,
            Err(e) if tries + 1 < WRITE_TRIES => {
                tries += 1;
                tracing::warn!(error = %e, tries, "claiming reservations failed, retrying");
                tokio::time::sleep(BACKOFF_MIN * tries).await;
            }
            Err(e) => return Err(WriteError::Redis(e)),
        }
    };
    let mut tries = 0;
    loop {
        match order_writer::write_batch(&ctx.db, messages, &released, ctx.writer_config()).await {
            Ok(o) => {
                ctx.transient_failures.store(0, Ordering::Relaxed);
                return Ok(o);
            }
            Err(e) if (e.is_transient() || e.is_race()) && tries + 1 < WRITE_TRIES => {
                tries += 1;
                tracing::debug!(error = %e, tries, "transient write failure, retrying");
                tokio::time::sleep(BACKOFF_MIN * tries).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// After commit: results and reservations to Redis, the orders' delayed
/// close messages, then the acks.
async fn finish(
    ctx: &WorkerContext,
    closes: &Channel,
    items: &[(Delivery, OrderMessage)],
    outcomes: &[Outcome],
) -> lapin::Result<()> {
    let already = outcomes.iter().filter(|o| o.already_settled).count();
    METRICS.already_processed.inc_by(already as u64);
    let mut redis = ctx.redis.clone();
    let mut tries = 0u32;
    loop {
        match results::publish(&mut redis, &ctx.keys, outcomes).await {
            Ok(_) => break,
            Err(e) if tries + 1 < WRITE_TRIES => {
                tries += 1;
                tracing::warn!(error = %e, tries, "writing results to Redis failed, retrying");
                tokio::time::sleep(BACKOFF_MIN * tries).await;
            }
            Err(e) => {
                // Committed, but not settled in Redis: the redelivery finds
                // the rows and settles again.
                let step = ctx.transient_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "results not written to Redis; requeueing the batch");
                tokio::time::sleep(backoff(step)).await;
                return requeue_now(items, "redis").await;
            }
        }
    }
    schedule_closes(ctx, closes, outcomes).await;
    let acks = items
        .iter()
        .map(|(d, _)| d.acker.ack(BasicAckOptions::default()));
    for r in futures::future::join_all(acks).await {
        r?;
    }
    Ok(())
}

/// Schedules the timeout close of every order of the batch, including
/// orders found again on a redelivery (their first schedule may be what
/// got lost; a close is idempotent, so a second message is harmless). A
/// failure is only logged: the sweeper closes overdue orders either way.
async fn schedule_closes(ctx: &WorkerContext, closes: &Channel, outcomes: &[Outcome]) {
    let orders: Vec<(String, u64)> = outcomes
        .iter()
        .filter_map(|o| match &o.settlement {
            Settlement::Success { order_id } => Some((order_id.clone(), o.message.sale_id)),
            Settlement::Failed { .. } => None,
        })
        .collect();
    if orders.is_empty() {
        return;
    }
    let wait = Duration::from_millis(ctx.config.amqp.confirm_timeout_ms.max(1));
    match tokio::time::timeout(wait, closer::schedule(closes, &ctx.config.amqp, &orders)).await {
        Ok(Ok(confirmed)) => {
            let label = if confirmed { "ok" } else { "failed" };
            METRICS
                .closes_scheduled
                .with_label_values(&[label])
                .inc_by(orders.len() as u64);
        }
        Ok(Err(e)) => {
            METRICS
                .closes_scheduled
                .with_label_values(&["failed"])
                .inc_by(orders.len() as u64);
            tracing::warn!(error = %e, orders = orders.len(), "could not schedule order closes; the sweeper will close them");
        }
        Err(_) => {
            METRICS
                .closes_scheduled
                .with_label_values(&["failed"])
                .inc_by(orders.len() as u64);
            tracing::warn!(
                orders = orders.len(),
                "scheduling order closes timed out; the sweeper will close them"
            );
        }
    }
}

async fn requeue_now(items: &[(Delivery, OrderMessage)], cause: &str) -> lapin::Result<()> {
    METRICS
        .requeued
        .with_label_values(&[cause])
        .inc_by(items.len() as u64);
    let nacks = items.iter().map(|(d, _)| {
        d.acker.nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        })
    });
    for r in futures::future::join_all(nacks).await {
        r?;
    }
    Ok(())
}

/// A message failed on its own with a non-transient error: count the
/// attempt; dead-letter it at the delivery limit, otherwise requeue it after
/// a backoff without holding up the consumer.
async fn failed_attempt(
    ctx: &Arc<WorkerContext>,
    (delivery, message): (Delivery, OrderMessage),
    error: WriteError,
) -> lapin::Result<()> {
    let key = ctx.attempts_key(&message.message_id);
    let mut redis = ctx.redis.clone();
    let attempts: u64 = match redis::pipe()
        .cmd("INCR")
        .arg(&key)
        .cmd("EXPIRE")
        .arg(&key)
        .arg(ATTEMPTS_TTL_SECS)
        .ignore()
        .query_async::<(u64,)>(&mut redis)
        .await
    {
        Ok((n,)) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot count the attempt in Redis");
            1
        }
    };
    let limit = u64::from(ctx.config.amqp.delivery_limit.max(1));
    if attempts >= limit {
        tracing::error!(
            message_id = %message.message_id, attempts, error = %error,
            "order message keeps failing; dead-lettering it"
        );
        METRICS
            .dead_lettered
            .with_label_values(&["delivery_limit"])
            .inc();
        delivery
            .acker
            .reject(BasicRejectOptions { requeue: false })
            .await?;
        let _: Result<(), _> = redis::cmd("DEL").arg(&key).query_async(&mut redis).await;
        return Ok(());
    }
    let wait = backoff(u32::try_from(attempts).unwrap_or(u32::MAX));
    tracing::warn!(
        message_id = %message.message_id, attempts, limit, retry_in = ?wait, error = %error,
        "order message failed; requeueing it later"
    );
    METRICS.requeued.with_label_values(&["failed"]).inc();
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        let _ = delivery
            .acker
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await;
    });
    Ok(())
}
