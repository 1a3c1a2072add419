//! The gateway's order publisher: hands admitted purchases to RabbitMQ and
//! reports, per message, whether the broker has taken responsibility for it.
//!
//! Data flow: the seckill route admits a buyer in Redis (stock reserved),
//! builds an [`OrderMessage`] and calls [`OrderPublisher::publish`]. The
//! message goes as persistent JSON, `mandatory`, to the order exchange with
//! the order routing key ([`amqp_topology::order_routing_key`]) on one of a
//! few confirm-mode channels of one connection. `publish` returns `Ok` only
//! when the broker positively confirmed a message it could route to the
//! order queue; every other outcome is an error the caller answers with
//! `503` after rolling the reservation back (SPEC §3, invariant 3).
//!
//! Throughput: publishes are never serialised behind a lock held across the
//! broker round trip. Channels are used round-robin and each publish awaits
//! its own confirm. The only lock is a per-channel one held for the
//! synchronous first poll of `basic_publish`, because lapin numbers a publish
//! (its confirm delivery tag) and queues its frames under two different
//! locks: two concurrent publishers on one channel could otherwise be
//! numbered in one order and sent in the other, so the broker's confirm for
//! one message would resolve the other's future.
//!
//! Returned messages: lapin attaches a `basic.return` to whichever confirm
//! it resolves next, and with coalesced (`multiple`) acks that need not be
//! the returned message's own. The publisher therefore identifies returns by
//! `message_id`: a return carried by another message's confirm is recorded
//! for its owner, and a publish whose confirm carried any return fails
//! closed with [`PublishError::Returned`]. A tiny race remains (the owner can
//! read its plain ack before the carrier records the return); the workers'
//! reservation timeout is the safety net for that case.
//!
//! Reconnection: the current connection and its channels form one "link"
//! held in an [`ArcSwapOption`]. A publish that finds the link missing or
//! closed, or whose publish/confirm fails with a channel or connection
//! error, or that times out while the link confirmed nothing at all, drops
//! the link, fails fast with [`PublishError::Connection`] (or
//! [`PublishError::Timeout`]) and starts one background reconnect loop
//! (exponential backoff; an atomic flag keeps concurrent publishers from
//! starting more). The loop reconnects, redeclares the topology and installs
//! the new link, so publishes succeed again without restarting the gateway.
//! A connection-level error event from lapin starts the same loop at once,
//! before the next publish notices.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures::StreamExt;
use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Event};
use seckill_contracts::amqp_topology;
use seckill_contracts::brokers;
use seckill_contracts::config::AmqpConfig;
use seckill_contracts::OrderMessage;

/// Confirm-mode channels per connection. A few channels let the broker's
/// per-channel processes work in parallel and keep one slow confirm stream
/// from delaying all publishes; more buys nothing on one connection.
pub const CHANNELS: usize = 4;

/// Upper bound for connecting, opening channels and declaring topology, so
/// a black-holed broker address cannot hang start-up or the reconnect loop.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// First and longest wait between reconnect attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How long a return recorded for another publish is kept for its owner.
const RETURNED_TTL: Duration = Duration::from_secs(60);

/// Why a message was not accepted by RabbitMQ. Except for
/// [`PublishError::Timeout`] and a [`PublishError::Connection`] raised while
/// waiting for the confirm, the message is known not to be in the queue; in
/// those two cases it may or may not be, which is why the workers tolerate a
/// message whose reservation was rolled back.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker returned the mandatory message: no queue is bound to the
    /// exchange for the order routing key (the topology was deleted or
    /// changed under the gateway).
    #[error(
        "RabbitMQ returned the message as unroutable: no queue is bound for the order routing key"
    )]
    Returned,
    /// The broker answered the publish with a negative confirm (an internal
    /// error of the queue); the message was not stored.
    #[error("RabbitMQ refused the message (negative publisher confirm)")]
    Nacked,
    /// No confirm arrived within `amqp.confirm_timeout_ms`.
    #[error("no publisher confirm from RabbitMQ within the confirm timeout")]
    Timeout,
    /// The broker blocked publishing on this connection (memory or disk
    /// alarm); failing at once beats waiting out the confirm timeout.
    #[error("RabbitMQ is blocking publishers (resource alarm)")]
    Blocked,
    /// No usable connection or channel; a reconnect is under way.
    #[error("RabbitMQ connection unavailable: {0}")]
    Connection(String),
    /// Connected, but the topology could not be declared (for example a
    /// queue exists with different arguments: `PRECONDITION_FAILED`).
    #[error("RabbitMQ topology could not be declared: {0}")]
    Topology(String),
    /// The message or a configured name cannot be expressed in AMQP
    /// (a name or message id longer than 255 bytes).
    #[error("message cannot be published: {0}")]
    Invalid(String),
}

impl PublishError {
    /// A short fixed name for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            PublishError::Returned => "returned",
            PublishError::Nacked => "nacked",
            PublishError::Timeout => "timeout",
            PublishError::Blocked => "blocked",
            PublishError::Connection(_) => "connection",
            PublishError::Topology(_) => "topology",
            PublishError::Invalid(_) => "invalid",
        }
    }
}

/// Publishes order messages with publisher confirms over a self-healing
/// connection. `Send + Sync`: build one per gateway process and share it via
/// `Arc` between all proxy threads.
pub struct OrderPublisher {
    shared: Arc<Shared>,
}

/// State shared with the background reconnect and watcher tasks (which hold
/// it weakly, so dropping the publisher stops them).
struct Shared {
    config: AmqpConfig,
    close_delay_ms: u64,
    exchange: ShortString,
    routing_key: ShortString,
    confirm_timeout: Duration,
    link: ArcSwapOption<Link>,
    /// True while one reconnect loop runs.
    reconnecting: AtomicBool,
    generation: AtomicU64,
    next_channel: AtomicUsize,
    /// Fallback runtime for background tasks when the caller is not on one.
    runtime: tokio::runtime::Handle,
    returned: ReturnedIds,
    epoch: Instant,
}

/// One connection and its confirm-mode channels.
struct Link {
    generation: u64,
    connection: Connection,
    channels: Vec<PublishChannel>,
    /// Milliseconds since `Shared::epoch` of the latest confirm of any kind;
    /// tells a stalled link from one slow message.
    last_confirm_ms: AtomicU64,
}

struct PublishChannel {
    channel: Channel,
    /// Held only during the synchronous first poll of `basic_publish`: keeps
    /// delivery-tag order equal to wire order (see the module docs).
    submit: Mutex<()>,
}

impl OrderPublisher {
    /// Connects to `config.url`, opens [`CHANNELS`] confirm-mode channels and
    /// declares the topology ([`amqp_topology::declare`] with
    /// `close_delay_ms`, which must be the value the workers use:
    /// [`amqp_topology::close_delay_ms`]). Fails rather than starting
    /// half-connected, so a misconfigured gateway does not come up. The
    /// connection's tasks run on the current tokio runtime, which must
    /// outlive the publisher.
    pub async fn connect(
        config: &AmqpConfig,
        close_delay_ms: u64,
    ) -> Result<OrderPublisher, PublishError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| PublishError::Connection(format!("no tokio runtime: {e}")))?;
        let short = |s: &str| {
            ShortString::try_new(s).map_err(|e| PublishError::Invalid(format!("`{s}`: {e}")))
        };
        let shared = Arc::new(Shared {
            config: config.clone(),
            close_delay_ms,
            exchange: short(&config.exchange)?,
            routing_key: short(amqp_topology::order_routing_key(config))?,
            confirm_timeout: Duration::from_millis(config.confirm_timeout_ms),
            link: ArcSwapOption::empty(),
            reconnecting: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            next_channel: AtomicUsize::new(0),
            runtime,
            returned: ReturnedIds::default(),
            epoch: Instant::now(),
        });
        let link = shared.open_link().await?;
        shared.install(link);
        Ok(OrderPublisher { shared })
    }

    /// Publishes one order message: JSON body, persistent (delivery mode 2),
    /// `application/json`, AMQP `message_id` = `msg.message_id`,
    /// `mandatory`, to the order exchange with the order routing key, then
    /// awaits its publisher confirm for at most `confirm_timeout_ms`.
    ///
    /// `Ok` only for a positive confirm of a routed message. Errors:
    /// [`PublishError::Returned`] (unroutable), [`PublishError::Nacked`],
    /// [`PublishError::Timeout`], [`PublishError::Blocked`], and
    /// [`PublishError::Connection`] when no usable connection exists; the
    /// latter returns at once (never waits for the broker to come back) and
    /// triggers a background reconnect.
    pub async fn publish(&self, msg: &OrderMessage) -> Result<(), PublishError> {
        let shared = &self.shared;
        let message_id = ShortString::try_new(msg.message_id.as_str())
            .map_err(|e| PublishError::Invalid(format!("message_id: {e}")))?;
        let (link, index) = shared.usable_channel()?;
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(message_id);
        let started_ms = shared.now_ms();
        let attempt = tokio::time::timeout(
            shared.confirm_timeout,
            shared.send_and_confirm(&link.channels[index], &msg.to_json(), properties),
        )
        .await;
        match attempt {
            Err(_elapsed) => {
                // One slow confirm among many is just a timeout; a link that
                // confirmed nothing while we waited is stalled (half-open
                // TCP, hung broker) and is replaced.
                if link.last_confirm_ms.load(Ordering::Acquire) <= started_ms {
                    shared.invalidate(link.generation, "no publisher confirms within the timeout");
                }
                Err(PublishError::Timeout)
            }
            Ok(Err(error)) => {
                let reason = error.to_string();
                shared.invalidate(link.generation, &reason);
                Err(PublishError::Connection(reason))
            }
            Ok(Ok(confirmation)) => {
                link.last_confirm_ms
                    .fetch_max(shared.now_ms(), Ordering::AcqRel);
                let outcome = classify(confirmation, &msg.message_id, &shared.returned);
                if let Err(PublishError::Connection(reason)) = &outcome {
                    // A channel that confirms nothing is useless: replace it.
                    shared.invalidate(link.generation, reason);
                }
                outcome
            }
        }
    }

    /// Whether the connection and all its channels are currently open. For
    /// the gateway's `/healthz` and its `gateway_broker_connected` gauge; a
    /// `true` can turn stale at any moment, so callers still handle
    /// [`publish`](Self::publish) errors.
    pub fn is_connected(&self) -> bool {
        self.shared.link.load().as_ref().is_some_and(|link| {
            link.connection.status().connected()
                && link.channels.iter().all(|c| c.channel.status().connected())
        })
    }

    /// Closes the current connection as a broker restart would look to the
    /// publisher, without reconnecting. For tests of the reconnect path only.
    #[doc(hidden)]
    pub async fn close_for_test(&self) {
        if let Some(link) = self.shared.link.load_full() {
            let _ = link.connection.close(200, "closed by test".into()).await;
        }
    }
}

impl Shared {
    /// The current link and the index of the channel this publish uses, or
    /// the reason there is none (a closed link is dropped and replaced).
    fn usable_channel(self: &Arc<Self>) -> Result<(Arc<Link>, usize), PublishError> {
        let Some(link) = self.link.load_full() else {
            self.trigger_reconnect();
            return Err(PublishError::Connection(
                "not connected to RabbitMQ; reconnecting".into(),
            ));
        };
        let status = link.connection.status();
        if !status.connected() {
            self.invalidate(link.generation, "connection is closed");
            return Err(PublishError::Connection(
                "RabbitMQ connection is closed; reconnecting".into(),
            ));
        }
        if status.blocked() {
            return Err(PublishError::Blocked);
        }
        let index = self.next_channel.fetch_add(1, Ordering::Relaxed) % link.channels.len();
        if !link.channels[index].channel.status().connected() {
            self.invalidate(link.generation, "channel is closed");
            return Err(PublishError::Connection(
                "RabbitMQ channel is closed; reconnecting".into(),
            ));
        }
        Ok((link, index))
    }

    /// Publishes on `slot` (mandatory, to the order exchange and routing
    /// key) and waits for the broker's confirm.
    async fn send_and_confirm(
        &self,
        slot: &PublishChannel,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<Confirmation, lapin::Error> {
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let publish = slot.channel.basic_publish(
            self.exchange.clone(),
            self.routing_key.clone(),
            options,
            payload,
            properties,
        );
        let mut publish = pin!(publish);
        // The first poll numbers the publish and queues its frames;
        // holding the channel's submit lock only for that synchronous
        // step keeps numbering and wire order identical.
        let first = poll_fn(|cx| {
            let _order = slot.submit.lock().unwrap_or_else(PoisonError::into_inner);
            Poll::Ready(publish.as_mut().poll(cx))
        })
        .await;
        let confirm = match first {
            Poll::Ready(result) => result?,
            Poll::Pending => publish.await?,
        };
        confirm.await
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Where background tasks run: the caller's runtime when there is one
    /// (it is alive: it is running us), else the one `connect` ran on.
    fn spawner(&self) -> tokio::runtime::Handle {
        tokio::runtime::Handle::try_current().unwrap_or_else(|_| self.runtime.clone())
    }

    /// Connects, declares the topology and opens the confirm-mode channels,
    /// all within [`CONNECT_TIMEOUT`].
    async fn open_link(&self) -> Result<Link, PublishError> {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let open = async {
            let properties = ConnectionProperties::default()
                .with_connection_name("seckill-gateway order publisher".into());
            let (connection, _) = brokers::connect(&self.config, properties)
                .await
                .map_err(connection_error)?;
            let mut channels = Vec::with_capacity(CHANNELS);
            for i in 0..CHANNELS {
                let channel = connection
                    .create_channel()
                    .await
                    .map_err(connection_error)?;
                if i == 0 {
                    amqp_topology::declare(&channel, &self.config, self.close_delay_ms)
                        .await
                        .map_err(|e| {
                            if e.is_amqp_soft_error() {
                                PublishError::Topology(e.to_string())
                            } else {
                                connection_error(e)
                            }
                        })?;
                }
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(connection_error)?;
                channels.push(PublishChannel {
                    channel,
                    submit: Mutex::new(()),
                });
            }
            Ok(Link {
                generation,
                connection,
                channels,
                last_confirm_ms: AtomicU64::new(self.now_ms()),
            })
        };
        tokio::time::timeout(CONNECT_TIMEOUT, open)
            .await
            .unwrap_or_else(|_| {
                Err(PublishError::Connection(format!(
                    "connecting to RabbitMQ took longer than {CONNECT_TIMEOUT:?}"
                )))
            })
    }

    /// Makes `link` current and watches its connection for error events,
    /// so a broker restart starts the reconnect before the next publish.
    fn install(self: &Arc<Self>, link: Link) {
        let generation = link.generation;
        let mut events = link.connection.events_listener();
        self.link.store(Some(Arc::new(link)));
        let weak = Arc::downgrade(self);
        self.spawner().spawn(async move {
            while let Some(event) = events.next().await {
                if let Event::Error(error) = event {
                    if let Some(shared) = weak.upgrade() {
                        shared.invalidate(generation, &error.to_string());
                    }
                    return;
                }
                match weak.upgrade() {
                    Some(shared) if shared.current_generation() == Some(generation) => {}
                    _ => return,
                }
            }
        });
    }

    fn current_generation(&self) -> Option<u64> {
        self.link.load().as_ref().map(|link| link.generation)
    }

    /// Drops the link of `generation` if it is still current (later
    /// failures of the same link are no-ops), closes it so its pending
    /// confirms fail now rather than at their timeout, and reconnects.
    fn invalidate(self: &Arc<Self>, generation: u64, reason: &str) {
        let previous = self.link.rcu(|current| match current {
            Some(link) if link.generation == generation => None,
            other => other.clone(),
        });
        let Some(old) = previous.filter(|link| link.generation == generation) else {
            return;
        };
        tracing::warn!(
            generation,
            reason,
            "RabbitMQ publisher link lost; reconnecting"
        );
        self.spawner().spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                old.connection.close(200, "publisher reconnecting".into()),
            )
            .await;
        });
        self.trigger_reconnect();
    }

    /// Starts the reconnect loop unless one is already running.
    fn trigger_reconnect(self: &Arc<Self>) {
        if self
            .reconnecting
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return;
        }
        let weak = Arc::downgrade(self);
        self.spawner().spawn(reconnect_loop(weak));
    }
}

/// Reconnects with exponential backoff until a link is installed or the
/// publisher is dropped.
async fn reconnect_loop(weak: Weak<Shared>) {
    let mut delay = BACKOFF_MIN;
    loop {
        let Some(shared) = weak.upgrade() else {
            return;
        };
        match shared.open_link().await {
            Ok(link) => {
                let generation = link.generation;
                shared.install(link);
                shared.reconnecting.store(false, Ordering::SeqCst);
                tracing::info!(generation, "RabbitMQ publisher reconnected");
                // A failure between install and clearing the flag found the
                // loop still "running" and did not start another: re-check.
                if shared.link.load().is_none() {
                    shared.trigger_reconnect();
                }
                return;
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?delay, "RabbitMQ publisher reconnect failed");
            }
        }
        drop(shared);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

fn connection_error(error: lapin::Error) -> PublishError {
    PublishError::Connection(error.to_string())
}

/// Maps a publisher confirm to the outcome of the publish of `own_id`,
/// attributing returned messages by message id (see the module docs).
fn classify(
    confirmation: Confirmation,
    own_id: &str,
    returned: &ReturnedIds,
) -> Result<(), PublishError> {
    match confirmation {
        Confirmation::Ack(None) => {
            if returned.take(own_id) {
                Err(PublishError::Returned)
            } else {
                Ok(())
            }
        }
        Confirmation::Ack(Some(message)) => {
            record_foreign(&message, own_id, returned);
            returned.take(own_id);
            Err(PublishError::Returned)
        }
        Confirmation::Nack(message) => {
            if let Some(message) = message {
                record_foreign(&message, own_id, returned);
            }
            returned.take(own_id);
            Err(PublishError::Nacked)
        }
        Confirmation::NotRequested => Err(PublishError::Connection(
            "RabbitMQ channel is not in publisher-confirm mode".into(),
        )),
    }
}

/// Records a return carried by another publish's confirm for its owner.
fn record_foreign(message: &BasicReturnMessage, own_id: &str, returned: &ReturnedIds) {
    if let Some(id) = message.delivery.properties.message_id() {
        if id.as_str() != own_id {
            returned.note(id.as_str());
        }
    }
}

/// Message ids whose return reached another publish's confirm. Empty in
/// normal operation, so the per-publish check is one atomic load.
#[derive(Default)]
struct ReturnedIds {
    len: AtomicUsize,
    inner: Mutex<ReturnedInner>,
}

#[derive(Default)]
struct ReturnedInner {
    ids: HashMap<String, Instant>,
    prune_at: usize,
}

impl ReturnedIds {
    fn note(&self, id: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        // Entries whose owner already decided are dropped by age; pruning
        // only when the map doubled keeps a storm of returns linear.
        if inner.ids.len() >= inner.prune_at {
            let now = Instant::now();
            inner
                .ids
                .retain(|_, noted| now.duration_since(*noted) < RETURNED_TTL);
            inner.prune_at = (inner.ids.len() * 2).max(1_024);
        }
        inner.ids.insert(id.to_string(), Instant::now());
        self.len.store(inner.ids.len(), Ordering::SeqCst);
    }

    fn take(&self, id: &str) -> bool {
        if self.len.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let hit = inner.ids.remove(id).is_some();
        self.len.store(inner.ids.len(), Ordering::SeqCst);
        hit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::message::Delivery;

    fn returned_message(id: &str) -> BasicReturnMessage {
        let mut delivery = Delivery::mock(0, "x".into(), "rk".into(), false, Vec::new());
        delivery.properties = BasicProperties::default().with_message_id(id.into());
        BasicReturnMessage {
            delivery,
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
        }
    }

    #[test]
    fn publisher_is_shareable_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<OrderPublisher>();
    }

    #[test]
    fn plain_ack_is_success() {
        let returned = ReturnedIds::default();
        assert!(classify(Confirmation::Ack(None), "a", &returned).is_ok());
    }

    #[test]
    fn nack_and_missing_confirm_mode_are_errors() {
        let returned = ReturnedIds::default();
        assert!(matches!(
            classify(Confirmation::Nack(None), "a", &returned),
            Err(PublishError::Nacked)
        ));
        assert!(matches!(
            classify(Confirmation::NotRequested, "a", &returned),
            Err(PublishError::Connection(_))
        ));
    }

    #[test]
    fn own_return_is_returned() {
        let returned = ReturnedIds::default();
        let confirmation = Confirmation::Ack(Some(returned_message("a")));
        assert!(matches!(
            classify(confirmation, "a", &returned),
            Err(PublishError::Returned)
        ));
        assert_eq!(returned.len.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn misattributed_return_reaches_its_owner() {
        let returned = ReturnedIds::default();
        // "a"'s confirm carried "b"'s return: "a" fails closed...
        let confirmation = Confirmation::Ack(Some(returned_message("b")));
        assert!(matches!(
            classify(confirmation, "a", &returned),
            Err(PublishError::Returned)
        ));
        // ...and "b", whose own confirm was a plain ack, learns it was returned.
        assert!(matches!(
            classify(Confirmation::Ack(None), "b", &returned),
            Err(PublishError::Returned)
        ));
        // Consumed: a later unrelated ack is a success again.
        assert!(classify(Confirmation::Ack(None), "b", &returned).is_ok());
    }

    #[test]
    fn returned_ids_prune_old_entries() {
        let returned = ReturnedIds::default();
        for i in 0..5_000 {
            returned.note(&format!("id-{i}"));
        }
        assert_eq!(returned.len.load(Ordering::SeqCst), 5_000);
        assert!(returned.take("id-4999"));
        assert!(!returned.take("id-4999"));
        {
            let mut inner = returned.inner.lock().unwrap();
            let old = Instant::now() - RETURNED_TTL - Duration::from_secs(1);
            for noted in inner.ids.values_mut() {
                *noted = old;
            }
            inner.prune_at = 0;
        }
        returned.note("fresh");
        assert_eq!(returned.len.load(Ordering::SeqCst), 1);
        assert!(returned.take("fresh"));
    }
}
