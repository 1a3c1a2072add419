//! One Redis handle type for both deployments the SPEC allows: a single node
//! or Redis Cluster. Callers use it like any async redis connection (it
//! implements [`redis::aio::ConnectionLike`]), cheaply cloned per task, and
//! never learn which one it is: key hash tags keep every multi-key script
//! single-slot either way.
//!
//! A cluster handle also watches its own connection. The cluster client
//! repairs itself after a master dies (it refreshes its slot map and
//! reconnects), but that repair can itself stall: seen on the scale-out
//! topology, a gateway's connection began a slot refresh while its
//! master was failing over and never finished it, so every call on it
//! waited until the caller gave up, for as long as the process lived,
//! while a fresh connection saw the new master at once. So every call is
//! timed by a [`Liveness`]: when no call has come back for
//! `redis.cluster_stall_ms` while calls were waiting, the handle connects
//! afresh and swaps the new connection in for every clone. A call that
//! comes back with an error counts as an answer: only silence is a stall.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use crate::config::RedisConfig;

/// A reconnecting connection to one node, or a cluster connection.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterHandle),
}

impl RedisConn {
    /// Connects per config. The single-node manager reconnects by itself
    /// after Redis restarts, which the recovery path relies on.
    pub async fn connect(config: &RedisConfig) -> RedisResult<RedisConn> {
        if config.cluster {
            Ok(RedisConn::Cluster(ClusterHandle::connect(config).await?))
        } else {
            let client = redis::Client::open(config.url.as_str())?;
            Ok(RedisConn::Single(ConnectionManager::new(client).await?))
        }
    }
}

/// Stalled cluster connections this process replaced, for its metrics.
static REPLACED: AtomicU64 = AtomicU64::new(0);

/// How many stalled cluster connections this process has replaced.
pub fn stalled_connections_replaced() -> u64 {
    REPLACED.load(Ordering::Relaxed)
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => {
                c.call(move |mut conn| async move { conn.req_packed_command(cmd).await })
            }
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
            RedisConn::Cluster(c) => c.call(move |mut conn| async move {
                conn.req_packed_commands(pipeline, offset, count).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(_) => 0,
        }
    }
}

/// A cluster connection shared by every clone, replaced when it stalls.
#[derive(Clone)]
pub struct ClusterHandle {
    shared: Arc<ClusterShared>,
}

struct ClusterShared {
    client: ClusterClient,
    current: ArcSwap<ClusterConnection>,
    liveness: Liveness,
    /// True while one replacement is being connected.
    replacing: AtomicBool,
}

impl ClusterHandle {
    async fn connect(config: &RedisConfig) -> RedisResult<ClusterHandle> {
        let client = ClusterClient::new(config.nodes())?;
        let conn = client.get_async_connection().await?;
        Ok(ClusterHandle {
            shared: Arc::new(ClusterShared {
                client,
                current: ArcSwap::from_pointee(conn),
                liveness: Liveness::new(Duration::from_millis(config.cluster_stall_ms)),
                replacing: AtomicBool::new(false),
            }),
        })
    }

    /// Runs one call on the current connection, timing it for the stall
    /// watch (a call dropped by its caller before it came back is counted
    /// as still waiting, which is the point).
    fn call<'a, T, F, Fut>(&self, op: F) -> RedisFuture<'a, T>
    where
        T: Send + 'a,
        F: FnOnce(ClusterConnection) -> Fut + Send + 'a,
        Fut: std::future::Future<Output = RedisResult<T>> + Send + 'a,
    {
        let shared = self.shared.clone();
        if shared.liveness.sending() {
            shared.replace();
        }
        let conn = ClusterConnection::clone(&shared.current.load());
        Box::pin(async move {
            let result = op(conn).await;
            shared.liveness.answered();
            result
        })
    }
}

impl ClusterShared {
    /// Connects afresh in the background and swaps the new connection in;
    /// a failed attempt keeps the old one (the next stall period retries).
    fn replace(self: &Arc<Self>) {
        if self.replacing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.replacing.store(false, Ordering::Release);
            return;
        };
        let shared = self.clone();
        runtime.spawn(async move {
            let stall = shared.liveness.stall;
            match tokio::time::timeout(stall, shared.client.get_async_connection()).await {
                Ok(Ok(conn)) => {
                    shared.current.store(Arc::new(conn));
                    REPLACED.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        stalled_ms = stall.as_millis() as u64,
                        "redis cluster connection stopped answering; replaced it with a fresh one"
                    );
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "redis cluster connection stalled; reconnecting failed")
                }
                Err(_) => tracing::warn!("redis cluster connection stalled; reconnecting timed out"),
            }
            shared.replacing.store(false, Ordering::Release);
        });
    }
}

/// Tells a connection that went silent from one that is merely busy: it
/// remembers since when calls have been waiting with none coming back,
/// and says when that has lasted `stall` (at most once per `stall`).
struct Liveness {
    stall: Duration,
    epoch: Instant,
    /// Milliseconds since `epoch`, plus one (0: nothing waiting), of the
    /// first call sent after the last answer.
    waiting_since: AtomicU64,
    /// When a replacement was last asked for (same clock).
    last_replace: AtomicU64,
}

impl Liveness {
    fn new(stall: Duration) -> Liveness {
        Liveness {
            stall,
            epoch: Instant::now(),
            waiting_since: AtomicU64::new(0),
            last_replace: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
    }

    /// A call is about to be sent; true when the connection should be
    /// replaced.
    fn sending(&self) -> bool {
        self.sending_at(self.now())
    }

    fn answered(&self) {
        self.waiting_since.store(0, Ordering::Release);
    }

    fn sending_at(&self, now: u64) -> bool {
        let stall = u64::try_from(self.stall.as_millis()).unwrap_or(u64::MAX);
        let since =
            match self
                .waiting_since
                .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return false,
                Err(since) => since,
            };
        if now.saturating_sub(since) < stall {
            return false;
        }
        let last = self.last_replace.load(Ordering::Acquire);
        if last != 0 && now.saturating_sub(last) < stall {
            return false;
        }
        self.last_replace
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn liveness() -> Liveness {
        Liveness::new(Duration::from_millis(3_000))
    }

    #[test]
    fn a_connection_that_keeps_answering_is_never_replaced() {
        let l = liveness();
        for t in (1..100_000).step_by(100) {
            assert!(!l.sending_at(t));
            l.answered();
        }
    }

    #[test]
    fn silence_while_calls_wait_asks_for_one_replacement_per_stall_period() {
        let l = liveness();
        assert!(!l.sending_at(1_000), "the first call starts the clock");
        assert!(!l.sending_at(3_999), "not yet a stall");
        assert!(l.sending_at(4_000), "3 s of silence");
        assert!(!l.sending_at(4_001), "one replacement at a time");
        assert!(!l.sending_at(6_999));
        assert!(l.sending_at(7_000), "still silent a period later: again");
    }

    #[test]
    fn an_answer_resets_the_clock() {
        let l = liveness();
        assert!(!l.sending_at(1_000));
        l.answered();
        assert!(!l.sending_at(3_500), "waiting again from 3.5 s");
        assert!(!l.sending_at(6_000));
        assert!(l.sending_at(6_500));
    }

    #[test]
    fn idle_time_is_not_a_stall() {
        let l = liveness();
        assert!(!l.sending_at(1_000));
        l.answered();
        // Nothing sent for a minute, then one call: it starts a new wait.
        assert!(!l.sending_at(61_000));
    }
}
