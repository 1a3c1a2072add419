//! The RabbitMQ side of the order worker: consume, batch, settle.
//!
//! A session connects and opens a manual-ack consumer with
//! `basic.qos(prefetch)` on the order queue (`broker_session`, which also
//! declares the shared topology and reconnects). Deliveries are collected into
//! batches of up to `worker.batch_size` messages, or whatever arrived within
//! `worker.batch_max_wait_ms` of the batch's first message; each batch
//! waits for its turn on the process's write schedule ([`super::pace`],
//! `worker.drain_orders_per_sec`) and is handled to the end before the
//! next is collected:
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
//!   (`KeySchema::worker_attempts`); below `amqp.delivery_limit`
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

use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions, ConfirmSelectOptions};
use lapin::{Channel, ConnectionProperties, Consumer};
use seckill_contracts::brokers;
use seckill_contracts::OrderMessage;
use tokio::sync::watch;
use tokio::time::Instant;

use super::backoff::Backoff;
use super::context::WorkerContext;
use super::metrics::METRICS;
use super::order_writer::{self, Outcome, Settlement, WriteError};
use super::{broker_session, closer, reservations, results};

/// In-process retries of a transient write before the batch is requeued.
const WRITE_TRIES: u32 = 3;
/// Pause before the n-th in-process retry: `n · RETRY_STEP`.
const RETRY_STEP: Duration = Duration::from_millis(100);
/// Requeues after a transient failure, failed attempts and reconnects.
const BACKOFF: Backoff = Backoff::new(RETRY_STEP, Duration::from_secs(5));
/// How long an attempt counter outlives the message's last failure.
const ATTEMPTS_TTL_SECS: u64 = 24 * 3600;

/// A delivery and the order message it carries.
type Item = (Delivery, OrderMessage);

/// Consumes until `stop` turns true, reconnecting with backoff after any
/// broker error. Returns once the in-flight batch is settled.
pub async fn consume(ctx: Arc<WorkerContext>, stop: watch::Receiver<bool>, index: usize) {
    broker_session::reconnecting("order consumer", stop, BACKOFF, |mut stop| {
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
    let (conn, _) = brokers::connect(amqp, props).await?;
    let channel = conn.create_channel().await?;
    // Close messages go out on their own confirm-mode channel, so waiting
    // for their confirms never mixes with the consumer's acks.
    let closes = conn.create_channel().await?;
    closes
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut consumer =
        broker_session::open_consumer(ctx, &channel, &amqp.queue, worker.prefetch).await?;
    let _live = broker_session::LiveConsumer::start();
    tracing::info!(queue = %amqp.queue, prefetch = worker.prefetch, batch = worker.batch_size, "consuming orders");

    let result: anyhow::Result<()> = loop {
        let first = match broker_session::next_delivery(&mut consumer, stop).await {
            Ok(Some(d)) => d,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.context("order consumer")),
        };
        let (batch, stream_end) = collect_batch(ctx, &mut consumer, first).await;
        let items = match parse_batch(batch).await {
            Ok(items) => items,
            Err(e) => break Err(e.into()),
        };
        // A batch that was all malformed has nothing to write, so it takes
        // no turn of the pace.
        if !items.is_empty() {
            let oldest = items.iter().map(|(_, m)| m.admitted_at_ms).min();
            if !ctx.pace.turn(items.len(), oldest, stop).await {
                // Stopping while the batch waits for its turn: it stays
                // unacked and goes back to the queue with the channel.
                break Ok(());
            }
            if let Err(e) = handle_items(ctx, &closes, items).await {
                break Err(e.into());
            }
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

/// `first` and whatever else arrives within `worker.batch_max_wait_ms` of
/// it, up to `worker.batch_size` deliveries. A broken stream ends the batch
/// early; its error comes back to end the session after the batch is
/// handled.
async fn collect_batch(
    ctx: &WorkerContext,
    consumer: &mut Consumer,
    first: Delivery,
) -> (Vec<Delivery>, Option<anyhow::Error>) {
    let worker = &ctx.config.worker;
    let batch_size = worker.batch_size.max(1);
    let deadline = Instant::now() + Duration::from_millis(worker.batch_max_wait_ms);
    let mut batch = vec![first];
    while batch.len() < batch_size {
        match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(Ok(d))) => batch.push(d),
            Ok(Some(Err(e))) => return (batch, Some(e.into())),
            Ok(None) => return (batch, Some(anyhow!("the broker cancelled the consumer"))),
            Err(_) => break,
        }
    }
    (batch, None)
}

/// What to do with messages whose write failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// The failure says nothing about the messages (MySQL or Redis
    /// trouble): hand them back after a backoff, without counting.
    Requeue,
    /// Something in the batch is refused: write each message alone, so one
    /// poison message holds back none of the others.
    OneByOne,
    /// This message is refused on its own: count the attempt.
    CountAttempt,
}

fn recovery(error: &WriteError, messages: usize) -> Recovery {
    if error.is_transient() {
        Recovery::Requeue
    } else if messages > 1 {
        Recovery::OneByOne
    } else {
        Recovery::CountAttempt
    }
}

/// Counts a batch as consumed and dead-letters what is no order message
/// of this version; the rest, with their messages, are what the pace and
/// the write go on with.
async fn parse_batch(batch: Vec<Delivery>) -> lapin::Result<Vec<Item>> {
    METRICS.consumed.inc_by(batch.len() as u64);
    reject_malformed(batch).await
}

/// Dead-letters the deliveries that are no order message of this version
/// and returns the others with their messages.
async fn reject_malformed(batch: Vec<Delivery>) -> lapin::Result<Vec<Item>> {
    let mut valid = Vec::with_capacity(batch.len());
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
    Ok(valid)
}

/// Writes `items` in one transaction and settles them; on failure applies
/// the [`Recovery`] the error calls for.
async fn handle_items(
    ctx: &Arc<WorkerContext>,
    closes: &Channel,
    mut items: Vec<Item>,
) -> lapin::Result<()> {
    let messages: Vec<OrderMessage> = items.iter().map(|(_, m)| m.clone()).collect();
    let error = match write(ctx, &messages).await {
        Ok(outcomes) => return finish(ctx, closes, &items, &outcomes).await,
        Err(e) => e,
    };
    match recovery(&error, items.len()) {
        Recovery::Requeue => {
            let wait = BACKOFF.delay(ctx.transient_failure());
            tracing::warn!(error = %error, messages = items.len(), retry_in = ?wait, "batch write failed; requeueing");
            tokio::time::sleep(wait).await;
            requeue_now(&items, "database").await
        }
        Recovery::OneByOne => {
            tracing::warn!(error = %error, messages = items.len(), "batch write failed; retrying its messages one by one");
            for item in items {
                Box::pin(handle_items(ctx, closes, vec![item])).await?;
            }
            Ok(())
        }
        Recovery::CountAttempt => match items.pop() {
            Some(item) => failed_attempt(ctx, item, error).await,
            None => Ok(()),
        },
    }
}

/// Runs `op` up to [`WRITE_TRIES`] times while `retry` says its error is
/// worth another immediate try, pausing a little longer each time.
async fn with_retries<T, E, Fut>(
    what: &str,
    mut op: impl FnMut() -> Fut,
    retry: impl Fn(&E) -> bool,
) -> Result<T, E>
where
    E: std::fmt::Display,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut tries = 1;
    loop {
        match op().await {
            Err(e) if tries < WRITE_TRIES && retry(&e) => {
                tracing::warn!(error = %e, tries, "{what} failed, retrying");
                tokio::time::sleep(RETRY_STEP * tries).await;
                tries += 1;
            }
            other => return other,
        }
    }
}

/// Claims the reservations, then the batch write, each retried in process
/// while the error is transient.
async fn write(ctx: &WorkerContext, messages: &[OrderMessage]) -> Result<Vec<Outcome>, WriteError> {
    let released = with_retries(
        "claiming reservations",
        || {
            let mut redis = ctx.redis.clone();
            async move { reservations::claim(&mut redis, &ctx.keys, messages).await }
        },
        |_| true,
    )
    .await
    .map_err(WriteError::Redis)?;
    let outcomes = with_retries(
        "the batch write",
        || order_writer::write_batch(&ctx.db, messages, &released, ctx.writer_config()),
        |e: &WriteError| e.is_transient() || e.is_race(),
    )
    .await?;
    ctx.transient_recovered();
    Ok(outcomes)
}

/// After commit: results and reservations to Redis, the orders' delayed
/// close messages, then the acks.
async fn finish(
    ctx: &WorkerContext,
    closes: &Channel,
    items: &[Item],
    outcomes: &[Outcome],
) -> lapin::Result<()> {
    let already = outcomes.iter().filter(|o| o.already_settled).count();
    METRICS.already_processed.inc_by(already as u64);
    let published = with_retries(
        "writing results to Redis",
        || {
            let mut redis = ctx.redis.clone();
            async move { results::publish(&mut redis, &ctx.keys, outcomes).await }
        },
        |_| true,
    )
    .await;
    if let Err(e) = published {
        // Committed, but not settled in Redis: the redelivery finds the
        // rows and settles again.
        let wait = BACKOFF.delay(ctx.transient_failure());
        tracing::warn!(error = %e, "results not written to Redis; requeueing the batch");
        tokio::time::sleep(wait).await;
        return requeue_now(items, "redis").await;
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

/// The orders of a batch that get a timeout close: every order, including
/// those found again on a redelivery (their first schedule may be what got
/// lost; a close is idempotent, so a second message is harmless).
fn orders_to_close(outcomes: &[Outcome]) -> Vec<(String, u64)> {
    outcomes
        .iter()
        .filter_map(|o| match &o.settlement {
            Settlement::Success { order_id } => Some((order_id.clone(), o.message.sale_id)),
            Settlement::Failed { .. } => None,
        })
        .collect()
}

/// Schedules the timeout close of the batch's orders ([`orders_to_close`]).
/// A failure is only logged: the sweeper closes overdue orders either way.
async fn schedule_closes(ctx: &WorkerContext, closes: &Channel, outcomes: &[Outcome]) {
    let orders = orders_to_close(outcomes);
    if orders.is_empty() {
        return;
    }
    let wait = Duration::from_millis(ctx.config.amqp.confirm_timeout_ms.max(1));
    let scheduled =
        tokio::time::timeout(wait, closer::schedule(closes, &ctx.config.amqp, &orders)).await;
    let label = match scheduled {
        Ok(Ok(true)) => "ok",
        Ok(Ok(false)) => "failed",
        Ok(Err(e)) => {
            tracing::warn!(error = %e, orders = orders.len(), "could not schedule order closes; the sweeper will close them");
            "failed"
        }
        Err(_) => {
            tracing::warn!(
                orders = orders.len(),
                "scheduling order closes timed out; the sweeper will close them"
            );
            "failed"
        }
    };
    METRICS
        .closes_scheduled
        .with_label_values(&[label])
        .inc_by(orders.len() as u64);
}

async fn requeue_now(items: &[Item], cause: &str) -> lapin::Result<()> {
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

/// What becomes of a message that failed on its own `attempts` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// At `amqp.delivery_limit`: into the dead-letter queue.
    DeadLetter,
    /// Below it: back to the queue after this wait.
    RetryAfter(Duration),
}

fn verdict(attempts: u64, delivery_limit: u32) -> Verdict {
    if attempts >= u64::from(delivery_limit.max(1)) {
        Verdict::DeadLetter
    } else {
        Verdict::RetryAfter(BACKOFF.delay(u32::try_from(attempts).unwrap_or(u32::MAX)))
    }
}

/// Counts one failed attempt of `message_id` in Redis and returns the
/// count. Redis trouble counts as a first attempt: the message is retried,
/// never dead-lettered because the counter could not be read.
async fn count_attempt(ctx: &WorkerContext, message_id: &str) -> u64 {
    let key = ctx.keys.worker_attempts(message_id);
    let mut redis = ctx.redis.clone();
    let counted = redis::pipe()
        .cmd("INCR")
        .arg(&key)
        .cmd("EXPIRE")
        .arg(&key)
        .arg(ATTEMPTS_TTL_SECS)
        .ignore()
        .query_async::<(u64,)>(&mut redis)
        .await;
    match counted {
        Ok((n,)) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot count the attempt in Redis");
            1
        }
    }
}

/// A message failed on its own with a non-transient error: count the
/// attempt; dead-letter it at the delivery limit, otherwise requeue it after
/// a backoff without holding up the consumer.
async fn failed_attempt(
    ctx: &Arc<WorkerContext>,
    (delivery, message): Item,
    error: WriteError,
) -> lapin::Result<()> {
    let attempts = count_attempt(ctx, &message.message_id).await;
    let limit = ctx.config.amqp.delivery_limit;
    let wait = match verdict(attempts, limit) {
        Verdict::RetryAfter(wait) => wait,
        Verdict::DeadLetter => {
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
            let mut redis = ctx.redis.clone();
            let _: Result<(), _> = redis::cmd("DEL")
                .arg(ctx.keys.worker_attempts(&message.message_id))
                .query_async(&mut redis)
                .await;
            return Ok(());
        }
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::statuses::FailReason;

    fn outcome(id: &str, sale: u64, settlement: Settlement, already: bool) -> Outcome {
        Outcome {
            message: OrderMessage::new(id.into(), sale, 1, 0),
            settlement,
            already_settled: already,
        }
    }

    #[test]
    fn transient_failures_requeue_whole_batches_uncounted() {
        let redis_down = WriteError::Redis(redis::RedisError::from(std::io::Error::other("gone")));
        assert_eq!(recovery(&redis_down, 1), Recovery::Requeue);
        assert_eq!(recovery(&redis_down, 50), Recovery::Requeue);
        let pool = WriteError::Database(sqlx::Error::PoolTimedOut);
        assert_eq!(recovery(&pool, 50), Recovery::Requeue);
    }

    #[test]
    fn refused_batches_split_and_a_refused_message_is_counted() {
        let refused = WriteError::GuardMissed(7);
        assert_eq!(recovery(&refused, 2), Recovery::OneByOne);
        assert_eq!(recovery(&refused, 1), Recovery::CountAttempt);
        let schema = WriteError::Database(sqlx::Error::RowNotFound);
        assert_eq!(recovery(&schema, 1), Recovery::CountAttempt);
    }

    #[test]
    fn the_delivery_limit_dead_letters_and_earlier_attempts_back_off() {
        assert_eq!(verdict(5, 5), Verdict::DeadLetter);
        assert_eq!(verdict(9, 5), Verdict::DeadLetter);
        let Verdict::RetryAfter(first) = verdict(1, 5) else {
            panic!("below the limit: retried");
        };
        let Verdict::RetryAfter(later) = verdict(4, 5) else {
            panic!("below the limit: retried");
        };
        assert!(later > first, "{later:?} > {first:?}");
        // A limit of 0 would dead-letter before any attempt: it means 1.
        assert_eq!(verdict(1, 0), Verdict::DeadLetter);
    }

    #[test]
    fn every_order_of_a_batch_is_scheduled_to_close_even_a_redelivered_one() {
        let success = |id: &str| Settlement::Success {
            order_id: id.into(),
        };
        let failed = Settlement::Failed {
            reason: FailReason::SoldOut,
            existing_order: None,
        };
        let outcomes = vec![
            outcome("m1", 1, success("o1"), false),
            outcome("m2", 1, failed, false),
            outcome("m3", 2, success("o3"), true),
        ];
        assert_eq!(
            orders_to_close(&outcomes),
            vec![("o1".to_string(), 1), ("o3".to_string(), 2)]
        );
        assert!(orders_to_close(&[]).is_empty());
    }

    #[tokio::test]
    async fn retries_stop_at_the_limit_or_when_told() {
        let mut calls = 0;
        let r: Result<(), String> = with_retries(
            "test",
            || {
                calls += 1;
                async { Err("busy".to_string()) }
            },
            |_| true,
        )
        .await;
        assert!(r.is_err());
        assert_eq!(calls, WRITE_TRIES);
        let mut calls = 0;
        let r: Result<(), String> = with_retries(
            "test",
            || {
                calls += 1;
                async { Err("refused".to_string()) }
            },
            |_| false,
        )
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1, "a refusal is not retried in process");
    }
}
