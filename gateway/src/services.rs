//! Process-wide services the rules reach through the host API: Redis, the
//! order publisher, the shared dict, the token buckets and the local view
//! of the sales.
//!
//! Redis and RabbitMQ connect lazily, on the proxy's own runtime, the first
//! time a rule needs them: their connection drivers must live on a runtime
//! that outlives the request, and a gateway whose broker is briefly down at
//! start must still come up and proxy everything else. A connect attempt
//! never outlasts the rule call that needs it: callers bound it by what the
//! call has left (see [`crate::handoff`]), so a black-holed address costs a
//! 503, never a cut call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use seckill_contracts::amqp_topology;
use seckill_contracts::config::Config;
use seckill_contracts::keys::KeySchema;
use seckill_contracts::message::OrderMessage;
use seckill_contracts::redis_client::RedisConn;
use tokio::sync::OnceCell;

use crate::decisions::Decisions;
use crate::limiter::TokenBuckets;
use crate::metrics;
use crate::publisher::{OrderPublisher, PublishError};
use crate::sale_directory::SaleDirectory;
use crate::shared_dict::SharedDict;

/// How many entries the shared dict and the bucket table keep at most.
const DICT_CAPACITY: u64 = 1_000_000;
const BUCKET_CAPACITY: u64 = 1_000_000;
/// A bucket unused this long is forgotten (and starts full again).
const BUCKET_IDLE: Duration = Duration::from_secs(600);
/// A Redis connect attempt that takes longer fails the request instead of
/// hanging it (within a rule call, the call's own deadline may cut it sooner).
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Everything the host API needs, shared by all VMs and versions.
pub struct HostServices {
    pub keys: KeySchema,
    pub dict: SharedDict,
    pub buckets: TokenBuckets,
    pub sales: Arc<SaleDirectory>,
    pub decisions: Decisions,
    config: Config,
    redis: OnceCell<RedisConn>,
    publisher: OnceCell<OrderPublisher>,
}

impl HostServices {
    pub fn new(config: &Config) -> HostServices {
        HostServices {
            keys: KeySchema::new(config.redis.key_prefix.clone()),
            dict: SharedDict::new(DICT_CAPACITY),
            buckets: TokenBuckets::new(BUCKET_CAPACITY, BUCKET_IDLE),
            sales: Arc::new(SaleDirectory::new(
                KeySchema::new(config.redis.key_prefix.clone()),
                Duration::from_millis(config.gateway.sale_info_ttl_ms),
                Duration::from_millis(config.gateway.sold_out_mark_ttl_ms),
            )),
            decisions: Decisions::default(),
            config: config.clone(),
            redis: OnceCell::new(),
            publisher: OnceCell::new(),
        }
    }

    /// The wall-clock limit of one rule call (`gateway.lua_call_timeout_ms`).
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.config.gateway.lua_call_timeout_ms)
    }

    /// Time kept at the end of a rule call for giving a reservation back
    /// (`gateway.rollback_reserve_ms`).
    pub fn rollback_reserve(&self) -> Duration {
        Duration::from_millis(self.config.gateway.rollback_reserve_ms)
    }

    /// How long a seckill buyer should wait before retrying when a failed
    /// hand-off could not give the unit back: the sweeper releases such a
    /// reservation after its timeout, on its next round.
    pub fn stranded_reservation_secs(&self) -> u64 {
        let worker = &self.config.worker;
        worker
            .reservation_timeout_secs
            .saturating_add(worker.sweep_interval_secs)
    }

    /// A Redis handle (cheap clone of the shared multiplexed connection).
    /// The first successful connect also starts following the sale events
    /// channel (on a thread of its own).
    pub async fn redis(&self) -> Result<RedisConn, String> {
        self.redis_within(REDIS_CONNECT_TIMEOUT).await
    }

    /// [`redis`](Self::redis), connecting for at most `limit`.
    pub async fn redis_within(&self, limit: Duration) -> Result<RedisConn, String> {
        let limit = limit.min(REDIS_CONNECT_TIMEOUT);
        let conn = self
            .redis
            .get_or_try_init(|| async {
                let conn = tokio::time::timeout(limit, RedisConn::connect(&self.config.redis))
                    .await
                    .map_err(|_| "redis connect timed out".to_string())?
                    .map_err(|e| format!("redis connect: {e}"))?;
                self.sales
                    .clone()
                    .follow_on_own_thread(self.config.redis.clone());
                Ok::<_, String>(conn)
            })
            .await?;
        Ok(conn.clone())
    }

    /// The order publisher's link, for `/healthz` and the
    /// `gateway_broker_connected` gauge: `not_connected` until a first
    /// connect succeeds (it happens lazily, when a seckill first needs the
    /// broker), then `connected` or `reconnecting`. A broker problem does not make the gateway unhealthy:
    /// it still proxies everything else, and every gateway shares the broker.
    pub fn broker_state(&self) -> &'static str {
        let state = match self.publisher.get() {
            None => "not_connected",
            Some(p) if p.is_connected() => "connected",
            Some(_) => "reconnecting",
        };
        metrics::BROKER_CONNECTED.set(i64::from(state == "connected"));
        state
    }

    /// Publishes an order message and waits for the broker's confirm. The
    /// first call connects; callers bound the whole call (connect included)
    /// with their own deadline, and a connect cut by it is simply tried
    /// again by the next publish.
    pub async fn publish(&self, msg: &OrderMessage) -> Result<(), String> {
        let close_delay_ms = amqp_topology::close_delay_ms(&self.config.worker);
        let publisher = self
            .publisher
            .get_or_try_init(|| async {
                OrderPublisher::connect(&self.config.amqp, close_delay_ms)
                    .await
                    .map_err(|e| format!("broker connect: {e}"))
            })
            .await?;
        let started = Instant::now();
        let result = publisher.publish(msg).await;
        let outcome = result
            .as_ref()
            .map_or_else(PublishError::kind, |()| "confirmed");
        metrics::PUBLISH_CONFIRM
            .with_label_values(&[outcome])
            .observe(started.elapsed().as_secs_f64());
        result.map_err(|e| e.to_string())
    }
}
