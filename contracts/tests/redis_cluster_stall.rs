//! A Redis Cluster connection that goes silent is replaced (see
//! `redis_client`): against a real one-node Redis Cluster of the test's
//! own (its own port and directory), reached through a TCP relay that can
//! freeze the connections it carries, as a stalled client looks from the
//! inside: calls sent, nothing back, while a fresh connection would work.
//!
//! One test function: the replacement count is process-wide.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use seckill_contracts::config::RedisConfig;
use seckill_contracts::redis_client::{stalled_connections_replaced, RedisConn};
use seckill_contracts::testkit::free_addr;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn a_silent_cluster_connection_is_replaced_and_a_busy_one_is_not() {
    let relay = Relay::start().await;
    let redis = OneNodeCluster::start(relay.port).await;
    relay.to(redis.port);
    let config = RedisConfig {
        url: format!("redis://127.0.0.1:{}/", relay.port),
        cluster: true,
        cluster_stall_ms: 500,
        ..RedisConfig::default()
    };
    let mut conn = RedisConn::connect(&config)
        .await
        .expect("cluster connection");
    let _: () = conn.set("{t}:k", "v").await.unwrap();

    // Errors are answers: a connection that keeps answering, even with
    // errors, is left alone.
    let replaced = stalled_connections_replaced();
    let until = Instant::now() + Duration::from_millis(1_500);
    while Instant::now() < until {
        let wrong: redis::RedisResult<i64> = conn.incr("{t}:k", 1).await;
        assert!(wrong.is_err(), "INCR of a string is an error reply");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        stalled_connections_replaced(),
        replaced,
        "replaced a busy connection"
    );

    // Every connection open now goes silent; new ones still work.
    relay.freeze_open_connections();
    let frozen_at = Instant::now();
    let answered_at = loop {
        let call = tokio::time::timeout(Duration::from_millis(200), conn.get("{t}:k"));
        if let Ok(Ok(value)) = call.await {
            let value: String = value;
            assert_eq!(value, "v");
            break frozen_at.elapsed();
        }
        assert!(
            frozen_at.elapsed() < Duration::from_secs(10),
            "the silent connection was never replaced"
        );
    };
    assert!(
        answered_at >= Duration::from_millis(500),
        "answered through a frozen connection after {answered_at:?}"
    );
    assert_eq!(stalled_connections_replaced(), replaced + 1);
    // Every clone uses the replacement.
    let mut clone = conn.clone();
    let value: String = clone.get("{t}:k").await.unwrap();
    assert_eq!(value, "v");
    println!(
        "a frozen connection was replaced; calls answered again {answered_at:?} after the freeze"
    );
}

/// A redis-server of the test's own with cluster mode on and every slot,
/// announcing the relay's port so the client reaches it only through the
/// relay. Killed on drop.
struct OneNodeCluster {
    port: u16,
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl OneNodeCluster {
    async fn start(announce_port: u16) -> OneNodeCluster {
        let dir = tempfile::tempdir().unwrap();
        let port = free_addr().port();
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--cluster-announce-ip", "127.0.0.1"])
            .args(["--cluster-announce-port", &announce_port.to_string()])
            .arg("--dir")
            .arg(dir.path())
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test installs it)");
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut conn = loop {
            if let Ok(c) = client.get_multiplexed_async_connection().await {
                break c;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let _: () = redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(0)
            .arg(16383)
            .query_async(&mut conn)
            .await
            .unwrap();
        loop {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut conn)
                .await
                .unwrap();
            if info.contains("cluster_state:ok") {
                break;
            }
            assert!(Instant::now() < deadline, "the cluster never became ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        OneNodeCluster {
            port,
            _child: child,
            _dir: dir,
        }
    }
}

/// A TCP relay to the Redis node; it can freeze every connection it has
/// accepted so far (they stay open and carry nothing) while it keeps
/// relaying new ones.
struct Relay {
    port: u16,
    accepted: Arc<AtomicUsize>,
    frozen_below: Arc<AtomicUsize>,
    target: Arc<std::sync::OnceLock<u16>>,
}

impl Relay {
    async fn start() -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let relay = Relay {
            port,
            accepted: Arc::default(),
            frozen_below: Arc::default(),
            target: Arc::default(),
        };
        let (accepted, frozen_below, target) = (
            relay.accepted.clone(),
            relay.frozen_below.clone(),
            relay.target.clone(),
        );
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let id = accepted.fetch_add(1, Ordering::SeqCst);
                let Some(&to) = target.get() else { continue };
                let frozen_below = frozen_below.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", to)).await {
                        pipe(client, server, id, frozen_below).await;
                    }
                });
            }
        });
        relay
    }

    /// Where connections are relayed to.
    fn to(&self, port: u16) {
        let _ = self.target.set(port);
    }

    fn freeze_open_connections(&self) {
        self.frozen_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// Copies both ways until either side closes; once connection `id` is
/// frozen it stops copying (and keeps both sockets open).
async fn pipe(client: TcpStream, server: TcpStream, id: usize, frozen_below: Arc<AtomicUsize>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let frozen = move || id < frozen_below.load(Ordering::SeqCst);
    let f1 = frozen.clone();
    let up = async move { copy_until_frozen(&mut cr, &mut sw, f1).await };
    let down = async move { copy_until_frozen(&mut sr, &mut cw, frozen).await };
    tokio::join!(up, down);
}

async fn copy_until_frozen<R, W>(from: &mut R, to: &mut W, frozen: impl Fn() -> bool)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen() {
            // Hold the connection open and silent for the rest of the test.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
