//! Process-wide services the rules reach through the host API: Redis, the
//! order publisher, the shared dict, the token buckets and the local view
//! of the sales.
//!
//! Redis and RabbitMQ connect lazily, on the proxy's own runtime, the first
//! time a rule needs them: their connection drivers must live on a runtime
//! that outlives the request, and a gateway whose broker is briefly down at
//! start must still come up and proxy everything else.

use std::sync::Arc;
use std::time::{Duration, Instant};

use seckill_contracts::config::Config;
use seckill_contracts::keys::KeySchema;
use seckill_contracts::message::OrderMessage;
use seckill_contracts::redis_client::RedisConn;
use tokio::sync::OnceCell;

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
/// A connect attempt that takes longer fails the request instead of hanging it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Everything the host API needs, shared by all VMs and versions.
pub struct HostServices {
    pub keys: KeySchema,
    pub dict: SharedDict,
    pub buckets: TokenBuckets,
    pub sales: Arc<SaleDirectory>,
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
            config: config.clone(),
            redis: OnceCell::new(),
            publisher: OnceCell::new(),
        }
    }

    /// A Redis handle (cheap clone of the shared multiplexed connection).
    /// The first successful connect also starts following the sale events
    /// channel, on the same long-lived runtime.
    pub async fn redis(&self) -> Result<RedisConn, String> {
        let conn = self
            .redis
            .get_or_try_init(|| async {
                let conn =
                    tokio::time::timeout(CONNECT_TIMEOUT, RedisConn::connect(&self.config.redis))
                        .await
                        .map_err(|_| "redis connect timed out".to_string())?
                        .map_err(|e| format!("redis connect: {e}"))?;
                tokio::spawn(self.sales.clone().follow(self.config.redis.clone()));
                Ok::<_, String>(conn)
            })
            .await?;
        Ok(conn.clone())
    }

    /// Publishes an order message and waits for the broker's confirm.
    pub async fn publish(&self, msg: &OrderMessage) -> Result<(), String> {
        let close_delay_ms = self.config.worker.order_timeout_secs.saturating_mul(1_000);
        let publisher = self
            .publisher
            .get_or_try_init(|| async {
                tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    OrderPublisher::connect(&self.config.amqp, close_delay_ms),
                )
                .await
                .map_err(|_| "broker connect timed out".to_string())?
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
