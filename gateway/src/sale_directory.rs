//! The gateway's local view of the sales: a short-lived copy of each sale's
//! info hash and a local sold-out mark, so a buyer's request for an unknown,
//! not yet started, ended or sold-out sale is answered without touching
//! Redis, which is what keeps a sold-out sale cheap at the edge.
//!
//! Data flow:
//!
//! ```text
//!  rule: seckill.sale(id) ──▶ cache hit? ──no──▶ HGETALL <sale>:info (one
//!                               │                read per id, however many
//!                               ▼                requests wait: single-flight)
//!                          snapshot + sold-out mark
//!  rule: seckill.sale_event(id, kind) ──▶ apply locally ──▶ PUBLISH
//!  Redis pub/sub (every gateway) ──▶ [`SaleDirectory::apply`]
//! ```
//!
//! Copies expire by themselves (`gateway.sale_info_ttl_ms`, marks
//! `gateway.sold_out_mark_ttl_ms`) because pub/sub is at-most-once; after a
//! reconnect of the subscriber every copy is dropped for the same reason.
//! None of this is trusted for admission: the Redis script re-checks the
//! window and the stock atomically. A stale copy can only cost a wrong
//! early answer (409/410) for at most its TTL, never a sale.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use redis::aio::ConnectionLike;
use seckill_contracts::config::{redacted_url, RedisConfig};
use seckill_contracts::keys::KeySchema;
use seckill_contracts::redis_client::RedisConn;
use seckill_contracts::sale_events::{self, SaleEvent, SaleEventKind, Stamped};

use tokio::sync::mpsc;

use crate::metrics;

/// How long "Redis has no such sale" is remembered: short, so a sale
/// created a moment ago is found quickly, but enough to absorb a flood of
/// requests for made-up ids.
const UNKNOWN_TTL: Duration = Duration::from_millis(1_000);
/// Pause before the subscriber reconnects.
const RESUBSCRIBE_PAUSE: Duration = Duration::from_millis(500);
/// Sale ids remembered as "existed once", to tell a sale whose Redis keys
/// vanished (answer "not ready") from an id that never existed (404).
const KNOWN_CAPACITY: u64 = 100_000;
const INFO_CAPACITY: u64 = 100_000;

/// What the info hash of a sale says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleSnapshot {
    pub sale_id: u64,
    pub starts_at_ms: i64,
    pub ends_at_ms: i64,
    pub stock_total: i64,
}

/// The answer of [`SaleDirectory::lookup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaleLookup {
    /// Redis has the sale's info.
    Ready(Arc<SaleSnapshot>),
    /// This gateway saw the sale before, but Redis has no info for it now
    /// (flushed or restarted): fail closed until it is rebuilt.
    NotReady,
    /// No such sale, as far as this gateway can tell.
    Unknown,
}

#[derive(Clone)]
struct Cached(Option<Arc<SaleSnapshot>>);

struct InfoExpiry {
    ttl: Duration,
}

impl moka::Expiry<u64, Cached> for InfoExpiry {
    fn expire_after_create(&self, _: &u64, v: &Cached, _: Instant) -> Option<Duration> {
        Some(if v.0.is_some() { self.ttl } else { UNKNOWN_TTL })
    }
}

/// The process-wide local view (one per gateway process, shared by every
/// proxy thread and rule version).
pub struct SaleDirectory {
    keys: KeySchema,
    info: moka::future::Cache<u64, Cached>,
    known: moka::sync::Cache<u64, ()>,
    sold_out: moka::sync::Cache<u64, ()>,
    /// Notices this gateway announces, sent by the sale-events thread on a
    /// connection of its own (set by [`SaleDirectory::follow_on_own_thread`]).
    outbox: OnceLock<mpsc::UnboundedSender<Stamped>>,
}

/// Why a sale could not be looked up.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("redis: {0}")]
    Redis(String),
}

impl SaleDirectory {
    pub fn new(keys: KeySchema, info_ttl: Duration, sold_out_ttl: Duration) -> SaleDirectory {
        SaleDirectory {
            keys,
            info: moka::future::Cache::builder()
                .max_capacity(INFO_CAPACITY)
                .expire_after(InfoExpiry { ttl: info_ttl })
                .build(),
            known: moka::sync::Cache::builder()
                .max_capacity(KNOWN_CAPACITY)
                .build(),
            sold_out: moka::sync::Cache::builder()
                .max_capacity(INFO_CAPACITY)
                .time_to_live(sold_out_ttl)
                .build(),
            outbox: OnceLock::new(),
        }
    }

    /// The sale's info, from the local copy or (once per id, concurrent
    /// callers wait for the same read) from Redis.
    pub async fn lookup<C>(&self, conn: &C, sale_id: u64) -> Result<SaleLookup, LookupError>
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        let key = self.keys.sale(sale_id).info();
        let cached = self
            .info
            .try_get_with(sale_id, async {
                let mut conn = conn.clone();
                let fields: Vec<(String, String)> = redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| LookupError::Redis(e.to_string()))?;
                Ok::<_, LookupError>(Cached(parse_info(sale_id, &fields).map(Arc::new)))
            })
            .await
            .map_err(|e| LookupError::Redis(e.to_string()))?;
        Ok(match cached.0 {
            Some(s) => {
                self.known.insert(sale_id, ());
                SaleLookup::Ready(s)
            }
            None if self.known.contains_key(&sale_id) => SaleLookup::NotReady,
            None => SaleLookup::Unknown,
        })
    }

    /// Whether this gateway holds a sold-out mark for the sale.
    pub fn is_sold_out(&self, sale_id: u64) -> bool {
        self.sold_out.contains_key(&sale_id)
    }

    /// Applies a notice locally (from a rule of this gateway or from the
    /// pub/sub channel).
    pub async fn apply(&self, event: SaleEvent) {
        match event.kind {
            SaleEventKind::Updated => {
                self.info.invalidate(&event.sale_id).await;
                self.sold_out.invalidate(&event.sale_id);
            }
            SaleEventKind::SoldOut => self.sold_out.insert(event.sale_id, ()),
            SaleEventKind::Reopened => self.sold_out.invalidate(&event.sale_id),
        }
    }

    /// Applies `event` here and tells every other gateway. A sold-out mark
    /// this gateway already holds (set by an earlier request, or heard from
    /// another gateway) is not announced again: at a sell-out, every
    /// request in flight learns of it at once, and one notice is enough.
    pub async fn announce<C: ConnectionLike>(
        &self,
        conn: &mut C,
        event: SaleEvent,
    ) -> Result<(), LookupError> {
        if event.kind == SaleEventKind::SoldOut {
            let fresh = self.sold_out.entry(event.sale_id).or_insert(()).is_fresh();
            if !fresh {
                return Ok(());
            }
        } else {
            self.apply(event).await;
        }
        let notice = Stamped::now(event);
        if let Some(outbox) = self.outbox.get() {
            if outbox.send(notice).is_ok() {
                return Ok(());
            }
        }
        sale_events::publish_stamped(conn, &self.keys, notice)
            .await
            .map_err(|e| LookupError::Redis(e.to_string()))
    }

    /// Forgets every copy and mark (after the subscriber missed notices).
    pub fn forget_all(&self) {
        self.info.invalidate_all();
        self.sold_out.invalidate_all();
    }

    /// [`follow`](Self::follow) and the publishing of this gateway's own
    /// notices, on a thread of its own with its own runtime and Redis
    /// connection, started once by the first request that needed Redis.
    /// Under a rush every proxy thread is busy: a notice must neither wait
    /// to be applied nor wait to be sent behind the very requests it exists
    /// to turn away (on the shared connection it queued behind them).
    pub fn follow_on_own_thread(self: Arc<Self>, config: RedisConfig) {
        let (outbox, sending) = mpsc::unbounded_channel();
        if self.outbox.set(outbox).is_err() {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("sale-events".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(async {
                        tokio::join!(
                            self.send_outbox(sending, config.clone()),
                            self.clone().follow(config)
                        );
                    }),
                    Err(e) => tracing::error!(error = %e, "sale events: no runtime"),
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "sale events: no thread; relying on TTLs");
        }
    }

    /// Publishes what [`announce`](Self::announce) queued, on a connection
    /// of its own, made up front (the first notice of a sale is the one
    /// that matters) and again after an error. A notice that cannot be sent
    /// is dropped with a warning: receivers age their copies out anyway.
    async fn send_outbox(&self, mut queued: mpsc::UnboundedReceiver<Stamped>, config: RedisConfig) {
        let mut conn = RedisConn::connect(&config).await.ok();
        while let Some(notice) = queued.recv().await {
            if conn.is_none() {
                match RedisConn::connect(&config).await {
                    Ok(c) => conn = Some(c),
                    Err(e) => tracing::warn!(error = %e, "sale events: cannot publish"),
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            if let Err(e) = sale_events::publish_stamped(c, &self.keys, notice).await {
                tracing::warn!(error = %e, sale_id = notice.event.sale_id, "sale event not published");
                conn = None;
            }
        }
    }

    /// Follows the sale events channel until the process ends, reconnecting
    /// after errors.
    pub async fn follow(self: Arc<Self>, config: RedisConfig) {
        let channel = self.keys.sale_events_channel();
        // PUBLISH reaches every node of a cluster, so any one node will do;
        // each resubscription goes to the next one, so a dead node is left
        // after one failure instead of being retried for as long as it is
        // down (with a single node, the list is that node).
        let nodes = config.nodes();
        for node in nodes.iter().cycle() {
            let shown = redacted_url(node);
            match self.follow_once(node, &channel).await {
                Ok(()) => {
                    tracing::warn!(node = %shown, "sale events subscription ended; resubscribing")
                }
                Err(e) => {
                    tracing::warn!(node = %shown, error = %e, "sale events subscription failed; retrying")
                }
            }
            // Whatever was published meanwhile is lost: start from scratch.
            self.forget_all();
            tokio::time::sleep(RESUBSCRIBE_PAUSE).await;
        }
    }

    async fn follow_once(&self, node: &str, channel: &str) -> redis::RedisResult<()> {
        let client = redis::Client::open(node)?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        self.forget_all();
        tracing::info!(channel, "following sale events");
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            match Stamped::from_json(msg.get_payload_bytes()) {
                Some(notice) => {
                    self.apply(notice.event).await;
                    observe_delay(&notice);
                }
                None => tracing::warn!(channel, "ignoring a malformed sale event"),
            }
        }
        Ok(())
    }
}

/// Counts how long `notice` took to get here, when its publisher stamped it.
fn observe_delay(notice: &Stamped) {
    if let Some(sent) = notice.published_at_ms {
        let delay_ms = seckill_contracts::clock::unix_ms().saturating_sub(sent);
        metrics::SALE_EVENT_DELAY
            .with_label_values(&[notice.event.kind.as_str()])
            .observe(delay_ms as f64 / 1000.0);
    }
}

/// The snapshot in an `HGETALL` reply; `None` when the hash is missing or
/// lacks the window (a half-written or foreign hash is not a sale).
fn parse_info(sale_id: u64, fields: &[(String, String)]) -> Option<SaleSnapshot> {
    let get = |name: &str| -> Option<i64> {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.parse().ok())
    };
    Some(SaleSnapshot {
        sale_id,
        starts_at_ms: get("starts_at_ms")?,
        ends_at_ms: get("ends_at_ms")?,
        stock_total: get("stock_total")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn parses_a_complete_info_hash_only() {
        let full = pairs(&[
            ("starts_at_ms", "1000"),
            ("ends_at_ms", "2000"),
            ("stock_total", "100"),
            ("goods_id", "7"),
        ]);
        assert_eq!(
            parse_info(3, &full),
            Some(SaleSnapshot {
                sale_id: 3,
                starts_at_ms: 1000,
                ends_at_ms: 2000,
                stock_total: 100
            })
        );
        assert_eq!(parse_info(3, &[]), None);
        assert_eq!(
            parse_info(
                3,
                &pairs(&[
                    ("starts_at_ms", "x"),
                    ("ends_at_ms", "1"),
                    ("stock_total", "1")
                ])
            ),
            None
        );
    }

    #[tokio::test]
    async fn marks_follow_events() {
        let d = SaleDirectory::new(
            KeySchema::new("t"),
            Duration::from_secs(5),
            Duration::from_secs(5),
        );
        assert!(!d.is_sold_out(1));
        d.apply(SaleEvent {
            sale_id: 1,
            kind: SaleEventKind::SoldOut,
        })
        .await;
        assert!(d.is_sold_out(1));
        assert!(!d.is_sold_out(2));
        d.apply(SaleEvent {
            sale_id: 1,
            kind: SaleEventKind::Reopened,
        })
        .await;
        assert!(!d.is_sold_out(1));
        d.apply(SaleEvent {
            sale_id: 1,
            kind: SaleEventKind::SoldOut,
        })
        .await;
        d.apply(SaleEvent {
            sale_id: 1,
            kind: SaleEventKind::Updated,
        })
        .await;
        assert!(!d.is_sold_out(1), "an update re-checks stock");
    }

    #[tokio::test]
    async fn marks_age_out() {
        let d = SaleDirectory::new(
            KeySchema::new("t"),
            Duration::from_secs(5),
            Duration::from_millis(50),
        );
        d.apply(SaleEvent {
            sale_id: 1,
            kind: SaleEventKind::SoldOut,
        })
        .await;
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(!d.is_sold_out(1));
    }
}
