//! The transactional outbox of the `message` payment mode, and the two
//! ends around it: a message is written into the sender's own database in
//! the same local transaction as the change it announces ([`put`]), a
//! relay publishes it to RabbitMQ with a publisher confirm and then marks
//! it published ([`spawn_relay`]), and the receiver consumes it with
//! manual acks ([`spawn_consumer`]), acting on it idempotently.
//!
//! ```text
//!  local tx { change + outbox row } ─▶ relay: publish, confirm, mark ─▶ queue ─▶ consumer: act (deduped), ack
//! ```
//!
//! A crash between any two steps repeats the later ones: a row committed
//! but not published is found by the relay's next sweep; a row published
//! but not marked is published again; a message acted on but not acked is
//! redelivered. So every message arrives at least once and receivers
//! dedupe. Several relays share one database: each takes its rows with
//! `FOR UPDATE SKIP LOCKED`, so no two publish the same row at once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, ConnectionProperties};
use seckill_contracts::config::Config;
use seckill_contracts::{amqp_topology, brokers};
use sqlx::{MySqlConnection, MySqlPool, Row};
use tokio::sync::{watch, Notify};

/// Rows one relay pass publishes.
const BATCH: i64 = 200;

/// A consumer's unacked deliveries at once, at least (more when it acts
/// on more at once).
const PREFETCH: u16 = 64;

/// Messages a consumer whose handler holds a database connection acts on
/// at once ([`spawn_consumer`]'s `at_once`): one at a time, that was what
/// limited the message mode, and each holds a connection, so this stays
/// well below a pool's size and payments keep theirs. A handler that
/// joins a group commit holds none, and may act on a whole group's worth.
/// Acting on messages out of order is safe: every receiver dedupes and
/// locks what it moves.
pub const ACTING_AT_ONCE: usize = 4;

/// How long a session waits before reconnecting to the broker.
const RECONNECT: Duration = Duration::from_millis(500);

/// Writes `payload` as message `message_id` in `conn`'s transaction.
pub async fn put(
    conn: &mut MySqlConnection,
    message_id: &str,
    payload: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO outbox (message_id, payload) VALUES (?, ?)")
        .bind(message_id)
        .bind(payload)
        .execute(conn)
        .await?;
    Ok(())
}

/// Rows deleted per [`prune`] call (a long backlog goes over several).
const PRUNE_BATCH: u32 = 1_000;

/// Deletes published rows older than `older_than_secs`; how many.
pub async fn prune(db: &MySqlPool, older_than_secs: u64) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "DELETE FROM outbox WHERE published_at IS NOT NULL \
         AND published_at < NOW(3) - INTERVAL ? SECOND LIMIT ?",
    )
    .bind(older_than_secs)
    .bind(PRUNE_BATCH)
    .execute(db)
    .await?
    .rows_affected())
}

/// Messages written and not yet published.
pub async fn pending(db: &MySqlPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")
        .fetch_one(db)
        .await
}

/// Why a relay pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("MySQL: {0}")]
    Db(#[from] sqlx::Error),
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker did not confirm message {0}")]
    NotConfirmed(String),
}

/// Publishes up to [`BATCH`] unpublished rows of `db` to `queue` on
/// `channel` (in confirm mode), each confirmed before the rows are marked;
/// how many it published.
pub async fn relay_once(
    db: &MySqlPool,
    channel: &Channel,
    queue: &str,
) -> Result<usize, RelayError> {
    // Read committed: the scan then locks the rows it takes and no gaps,
    // so writers appending messages meanwhile (a debit and its message in
    // one transaction) never wait on the relay, nor deadlock with it.
    let mut conn = db.acquire().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .execute(&mut *conn)
        .await?;
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let rows = sqlx::query(
        "SELECT id, message_id, payload FROM outbox WHERE published_at IS NULL \
         ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED",
    )
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut ids = Vec::with_capacity(rows.len());
    let mut confirms = Vec::with_capacity(rows.len());
    for row in &rows {
        let message_id: String = row.try_get("message_id")?;
        let payload: String = row.try_get("payload")?;
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload.as_bytes(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_message_id(message_id.as_str().into()),
            )
            .await?;
        confirms.push((message_id, confirm));
        ids.push(row.try_get::<u64, _>("id")?);
    }
    for (message_id, confirm) in confirms {
        let confirmation = confirm.await?;
        if !confirmation.is_ack() || confirmation.take_message().is_some() {
            return Err(RelayError::NotConfirmed(message_id));
        }
    }
    fail::fail_point!("outbox.after_publish", |_| Ok(0));
    let list = ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    sqlx::query(&format!(
        "UPDATE outbox SET published_at = NOW(3) WHERE id IN ({list})"
    ))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(ids.len())
}

/// Keeps relays and consumers running: dropping it stops every task
/// spawned with its [`Running::stopped`] receiver.
pub struct Running {
    stop: watch::Sender<()>,
}

impl Running {
    pub fn new() -> Running {
        Running {
            stop: watch::channel(()).0,
        }
    }

    /// What a spawned task watches: it ends when this `Running` is dropped.
    pub fn stopped(&self) -> watch::Receiver<()> {
        self.stop.subscribe()
    }
}

impl Default for Running {
    fn default() -> Self {
        Running::new()
    }
}

/// Runs a relay of `db`'s outbox into `queue` until `stop` ends: it
/// publishes whenever `wake` is notified (after each local transaction
/// that wrote a row) and every `payment.relay_interval_ms` regardless,
/// and deletes rows published more than `payment.message_retention_secs`
/// ago.
pub fn spawn_relay(
    config: &Config,
    db: MySqlPool,
    queue: String,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<()>,
) {
    let interval = Duration::from_millis(config.payment.relay_interval_ms);
    let config = config.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                ended = relay_session(&config, &db, &queue, &wake, interval) => {
                    if let Err(e) = ended {
                        tracing::warn!(error = %e, %queue, "outbox relay session ended; reconnecting");
                    }
                }
            }
            tokio::time::sleep(RECONNECT).await;
        }
    });
}

async fn relay_session(
    config: &Config,
    db: &MySqlPool,
    queue: &str,
    wake: &Notify,
    interval: Duration,
) -> anyhow::Result<()> {
    let (_conn, channel) = open(config).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let retention = config.payment.message_retention_secs;
    loop {
        // Drain, then sleep until woken or the interval passes.
        while relay_once(db, &channel, queue).await? == BATCH as usize {}
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(interval) => {
                if let Err(e) = prune(db, retention).await {
                    tracing::warn!(error = %e, "pruning the outbox failed");
                }
            }
        }
    }
}

/// Consumes `queue` until `stop` ends, calling `handle` with each
/// message's body, on up to `at_once` messages at a time: acked when it
/// returns `Ok`, requeued (after a pause) when it returns `Err`. A body
/// `handle` cannot read should be answered `Ok` by it (and logged):
/// requeueing it would only repeat it forever.
pub fn spawn_consumer<H, Fut, E>(
    config: &Config,
    queue: String,
    at_once: usize,
    handle: H,
    mut stop: watch::Receiver<()>,
) where
    H: Fn(Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    let config = config.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                ended = consume_session(&config, &queue, at_once, &handle) => {
                    if let Err(e) = ended {
                        tracing::warn!(error = %e, %queue, "payment consumer session ended; reconnecting");
                    }
                }
            }
            tokio::time::sleep(RECONNECT).await;
        }
    });
}

async fn consume_session<H, Fut, E>(
    config: &Config,
    queue: &str,
    at_once: usize,
    handle: &H,
) -> anyhow::Result<()>
where
    H: Fn(Vec<u8>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let (_conn, channel) = open(config).await?;
    channel
        .basic_qos(
            PREFETCH.max(u16::try_from(at_once).unwrap_or(u16::MAX)),
            BasicQosOptions::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut acting = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            next = consumer.next(), if acting.len() < at_once.max(1) => {
                let Some(delivery) = next else { break };
                acting.push(act_and_ack(handle, queue, delivery?));
            }
            Some(done) = acting.next(), if !acting.is_empty() => done?,
        }
    }
    while let Some(done) = acting.next().await {
        done?;
    }
    anyhow::bail!("the broker cancelled the consumer")
}

/// Acts on one delivery, then acks it; requeues it (after a pause) when
/// acting failed.
async fn act_and_ack<H, Fut, E>(
    handle: &H,
    queue: &str,
    delivery: lapin::message::Delivery,
) -> anyhow::Result<()>
where
    H: Fn(Vec<u8>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    // The error as text at once: it need not be `Send` across the pause.
    match handle(delivery.data.clone())
        .await
        .map_err(|e| e.to_string())
    {
        Ok(()) => {
            delivery.acker.ack(BasicAckOptions::default()).await?;
        }
        Err(e) => {
            tracing::warn!(error = %e, %queue, "payment message not settled; requeued");
            tokio::time::sleep(RECONNECT).await;
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await?;
        }
    }
    Ok(())
}

/// A fresh connection and a channel on it, the whole topology declared.
async fn open(config: &Config) -> anyhow::Result<(lapin::Connection, Channel)> {
    let (conn, _) = brokers::connect(&config.amqp, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    amqp_topology::declare(
        &channel,
        &config.amqp,
        amqp_topology::close_delay_ms(&config.worker),
    )
    .await?;
    Ok((conn, channel))
}
