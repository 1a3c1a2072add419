//! One Redis handle type for both deployments the SPEC allows: a single node
//! or Redis Cluster. Callers use it like any async redis connection (it
//! implements [`redis::aio::ConnectionLike`]), cheaply cloned per task, and
//! never learn which one it is: key hash tags keep every multi-key script
//! single-slot either way.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use crate::config::RedisConfig;

/// A reconnecting connection to one node, or a cluster connection.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Connects per config. The single-node manager reconnects by itself
    /// after Redis restarts, which the recovery path relies on.
    pub async fn connect(config: &RedisConfig) -> RedisResult<RedisConn> {
        if config.cluster {
            let client = redis::cluster::ClusterClient::new(config.nodes())?;
            Ok(RedisConn::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(config.url.as_str())?;
            Ok(RedisConn::Single(ConnectionManager::new(client).await?))
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}
