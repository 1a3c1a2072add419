//! The whole buyer-facing stack for end-to-end tests: the real gateway
//! binary running the repository's own `lua/` rules, two real `seckill-api`
//! processes behind it, a real `seckill-wallet` (its own database),
//! optionally a real `seckill-worker`, all on this test's own databases,
//! key prefix and queues (`TestEnv`).
//!
//! The api and worker binaries are built by `cargo test --workspace` (or
//! `cargo build --workspace`) next to the gateway binary; they are looked up
//! there.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use redis::AsyncCommands;
use seckill_contracts::config::Config;
use seckill_contracts::testkit::{free_addr, wait_ok, Process, TestEnv};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use super::{keys, GatewayProc};

pub const ADMIN_TOKEN: &str = "stack-admin-token-0123456789";
/// The api's secret on the wallet's internal routes.
pub const SERVICE_TOKEN: &str = "stack-service-token-0123456789";

/// Path of a binary of the workspace built next to the gateway's.
pub fn sibling_binary(name: &str) -> String {
    let path = Path::new(env!("CARGO_BIN_EXE_seckill-gateway")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` (scripts/test does)",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

/// Runs `seckillctl --config <config> <args>` → (success, stdout as JSON,
/// or stdout and stderr as a JSON string when it printed no JSON).
pub async fn seckillctl(config: &Path, args: &[&str]) -> (bool, Value) {
    let out = tokio::process::Command::new(sibling_binary("seckillctl"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        Value::String(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    });
    (out.status.success(), report)
}

/// Runs `seckillctl --config <config> demo --json --no-progress <args>`
/// and returns its report; panics with the output when it fails.
pub async fn run_demo(config: &Path, args: &[&str]) -> Value {
    let config = config.to_str().unwrap().to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(sibling_binary("seckillctl"))
            .args(["--config", &config, "demo", "--json", "--no-progress"])
            .args(&args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run seckillctl demo")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).expect("--json prints the report");
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    report
}

/// Copies the repository's rules (`lua/` and `lua/redis/`) into `dest`.
pub fn copy_repo_rules(dest: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lua");
    for sub in ["", "redis"] {
        std::fs::create_dir_all(dest.join(sub)).unwrap();
        for entry in std::fs::read_dir(src.join(sub)).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().and_then(|e| e.to_str()) == Some("lua") {
                std::fs::copy(&p, dest.join(sub).join(p.file_name().unwrap())).unwrap();
            }
        }
    }
}

/// What to start.
pub struct StackOptions {
    pub worker: bool,
    /// Broker address the gateway publishes to (a cuttable link in the
    /// broker-down test); `None` for the real one.
    pub gateway_amqp_url: Option<String>,
    /// Redis the gateway uses (a stallable link in the Redis-stall test);
    /// `None` for the real one.
    pub gateway_redis_url: Option<String>,
    /// `payment.mode` of the deployment; `None` for the default.
    pub payment_mode: Option<seckill_contracts::config::PaymentMode>,
}

pub struct Stack {
    pub env: TestEnv,
    pub config: Config,
    pub gateway: GatewayProc,
    pub apis: Vec<(SocketAddr, Process)>,
    pub wallet: Process,
    /// Where the wallet listens (its admin route tops wallets up).
    pub wallet_url: String,
    pub worker: Option<Process>,
    pub http: reqwest::Client,
    /// The TOML every process of the stack was started with (for CLI runs).
    pub config_path: PathBuf,
    tokens: Mutex<std::collections::HashMap<u64, String>>,
    _dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start(opts: StackOptions) -> Stack {
        let env = TestEnv::new().await;
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("lua");
        copy_repo_rules(&rules);
        let private = dir.path().join("private.pem");
        std::fs::write(&private, &keys().private_pem).unwrap();
        let api_addrs = [free_addr(), free_addr()];
        let mut config = GatewayProc::config(&env, &api_addrs, &rules);
        config.jwt.private_key_path = private;
        // One admin token for the deployment: the ops routes of the api
        // pass it on to the gateways' admin listeners.
        config.api.admin_token = Some(ADMIN_TOKEN.into());
        config.api.admin_token_path = None;
        config.gateway.admin_token = Some(ADMIN_TOKEN.into());
        config.worker.listen = free_addr();
        let wallet_addr = free_addr();
        let wallet_url = format!("http://{wallet_addr}");
        config.wallet.listen = wallet_addr;
        config.payment.wallet_urls = vec![wallet_url.clone()];
        config.payment.service_token = Some(SERVICE_TOKEN.into());
        config.payment.service_token_path = None;
        GatewayProc::route_wallet(&mut config, wallet_addr);
        if let Some(mode) = opts.payment_mode {
            config.payment.mode = mode;
        }
        // Sales in these tests start a moment after creation.
        config.gateway.sale_info_ttl_ms = 500;
        let shared = dir.path().join("stack.toml");
        std::fs::write(&shared, toml::to_string(&config).unwrap()).unwrap();
        let shared_arg = shared.to_str().unwrap().to_string();
        let log = [("RUST_LOG".to_string(), "warn".to_string())];

        let mut apis = Vec::new();
        for addr in api_addrs {
            let p = Process::spawn(
                &sibling_binary("seckill-api"),
                &["--config", &shared_arg, "--listen", &addr.to_string()],
                &log,
            );
            apis.push((addr, p));
        }
        let wallet = Process::spawn(
            &sibling_binary("seckill-wallet"),
            &["--config", &shared_arg],
            &log,
        );
        for (addr, _) in &apis {
            assert!(
                wait_ok(&format!("http://{addr}/healthz"), Duration::from_secs(30)).await,
                "api {addr} never became healthy"
            );
        }
        assert!(
            wait_ok(&format!("{wallet_url}/healthz"), Duration::from_secs(30)).await,
            "the wallet never became healthy"
        );
        let worker = opts.worker.then(|| {
            Process::spawn(
                &sibling_binary("seckill-worker"),
                &["--config", &shared_arg],
                &log,
            )
        });
        if opts.worker {
            let url = format!("http://{}/healthz", config.worker.listen);
            assert!(
                wait_ok(&url, Duration::from_secs(30)).await,
                "worker never became healthy"
            );
        }
        let mut gateway_config = config.clone();
        if let Some(url) = opts.gateway_amqp_url {
            gateway_config.amqp.url = url;
        }
        if let Some(url) = opts.gateway_redis_url {
            gateway_config.redis.url = url;
        }
        let gateway = GatewayProc::start(gateway_config).await;
        // Both api backends in rotation before a test relies on them.
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .unwrap();
        Stack {
            env,
            config,
            gateway,
            apis,
            wallet,
            wallet_url,
            worker,
            http,
            config_path: shared.clone(),
            tokens: Mutex::default(),
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        self.gateway.url(path)
    }

    /// `GET path` through the gateway without a token, as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let resp = self.http.get(self.url(path)).send().await.unwrap();
        resp.json().await.unwrap()
    }

    /// Registers `username` and logs in through the gateway, as a buyer
    /// does: (user id, access token).
    pub async fn sign_up(&self, username: &str) -> (u64, String) {
        let creds = json!({"username": username, "password": "correct horse"});
        let resp = self
            .http
            .post(self.url("/api/v1/auth/register"))
            .json(&creds)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let user_id = resp.json::<Value>().await.unwrap()["user_id"]
            .as_u64()
            .unwrap();
        let resp = self
            .http
            .post(self.url("/api/v1/auth/login"))
            .json(&creds)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let login: Value = resp.json().await.unwrap();
        assert_eq!(login["token_type"], "Bearer");
        assert_eq!(login["user_id"], user_id);
        (user_id, login["access_token"].as_str().unwrap().to_string())
    }

    /// A valid token for `user` (minted once per user: RSA signing is slow).
    pub fn token(&self, user: u64) -> String {
        let mut tokens = self.tokens.lock().unwrap();
        tokens
            .entry(user)
            .or_insert_with(|| self.gateway.token(user))
            .clone()
    }

    /// Creates a sale through an api's admin route (MySQL, then the Redis
    /// warm-up); `starts_in`/`lasts` in seconds from now (negative allowed).
    pub async fn create_sale(&self, stock: u32, starts_in: i64, lasts: i64) -> u64 {
        let now = chrono::Utc::now();
        let body = json!({
            "title": format!("Test sale {}", self.env.id),
            "price_cents": 1999,
            "sale_price_cents": 999,
            "stock": stock,
            "starts_at": now + chrono::Duration::seconds(starts_in),
            "ends_at": now + chrono::Duration::seconds(starts_in + lasts),
        });
        let resp = self
            .http
            .post(format!("http://{}/admin/sales", self.apis[0].0))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "create sale: {:?}", resp.text().await);
        let v: Value = resp.json().await.unwrap();
        v["id"].as_u64().unwrap()
    }

    /// Issues a hidden path for `user` directly in Redis, as the api does
    /// after a right captcha answer (the journey test goes through the api).
    pub async fn issue_path(&self, sale_id: u64, user: u64) -> String {
        let path = format!("{:032x}", rand_u128());
        let mut r = self.env.redis().await;
        let _: () = r
            .set_ex(self.env.keys().sale(sale_id).path(user), &path, 60)
            .await
            .unwrap();
        path
    }

    /// `POST /api/v1/seckill/{path}/{sale}` as `user` → (status, headers, body).
    pub async fn seckill(
        &self,
        user: u64,
        path: &str,
        sale_id: u64,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let resp = self
            .http
            .post(self.url(&format!("/api/v1/seckill/{path}/{sale_id}")))
            .bearer_auth(self.token(user))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.json().await.unwrap_or(Value::Null);
        (status, headers, body)
    }

    /// Everything an admission may change, to prove a refusal changed nothing.
    pub async fn snapshot(&self, sale_id: u64) -> Snapshot {
        let k = self.env.keys().sale(sale_id);
        let mut r = self.env.redis().await;
        let stock: Option<i64> = r.get(k.stock()).await.unwrap();
        let buyers: Vec<String> = r.smembers(k.buyers()).await.unwrap();
        let mut resv: Vec<(String, String)> = r.hgetall(k.reservations()).await.unwrap();
        resv.sort();
        let mut buyers = buyers;
        buyers.sort();
        Snapshot {
            stock,
            buyers,
            reservations: resv,
            queued: self.queue_len().await,
        }
    }

    /// Messages waiting in this test's order queue.
    pub async fn queue_len(&self) -> u32 {
        let conn = lapin::Connection::connect(&self.config.amqp.url, Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let n = match ch
            .queue_declare(
                self.config.amqp.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
        {
            Ok(q) => q.message_count(),
            // Not declared yet: nothing was ever published.
            Err(_) => 0,
        };
        let _ = conn.close(200, "done".into()).await;
        n
    }

    /// `kill -9` of the wallet service, then a new one on the same
    /// configuration, healthy before this returns.
    pub async fn kill_and_restart_wallet(&mut self) {
        self.wallet.signal("KILL");
        assert!(
            self.wallet
                .wait_exit(Duration::from_secs(10))
                .await
                .is_some(),
            "the wallet outlived kill -9"
        );
        let config = self.config_path.to_str().unwrap().to_string();
        self.wallet = Process::spawn(
            &sibling_binary("seckill-wallet"),
            &["--config", &config],
            &[("RUST_LOG".to_string(), "warn".to_string())],
        );
        assert!(
            wait_ok(
                &format!("{}/healthz", self.wallet_url),
                Duration::from_secs(30)
            )
            .await,
            "the restarted wallet never became healthy"
        );
    }

    /// Tops `user`'s wallet up with `cents` (the wallet's admin route).
    pub async fn credit(&self, user: u64, cents: i64) {
        let resp = self
            .http
            .post(format!("{}/admin/wallet/credit", self.wallet_url))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({ "user_id": user, "amount_cents": cents }))
            .send()
            .await
            .expect("wallet credit");
        assert_eq!(resp.status(), 200, "credit {user}");
    }

    pub async fn cleanup(self) {
        let Stack {
            env,
            gateway,
            apis,
            wallet,
            worker,
            ..
        } = self;
        drop(gateway);
        drop(apis);
        drop(wallet);
        drop(worker);
        env.cleanup().await;
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub stock: Option<i64>,
    pub buyers: Vec<String>,
    pub reservations: Vec<(String, String)>,
    pub queued: u32,
}

fn rand_u128() -> u128 {
    let a = uuid::Uuid::new_v4().as_u128();
    a ^ (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos())
}

/// A TCP link to a service (the broker, Redis) that the test can cut, as
/// if the service died (every open connection dropped, new ones refused);
/// turn into a black hole for new connections, as a service behind a dead
/// route looks (accepted, what they send swallowed, nothing ever answers);
/// or stall, as a host that vanished looks to the connections already open
/// (what they send is swallowed and nothing answers until the stall ends,
/// which closes them, as the client's own timeouts eventually would).
pub struct CuttableLink {
    /// The service's URL through the link (AMQP links; empty for TCP ones).
    pub url: String,
    pub addr: SocketAddr,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
    black_hole: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
}

impl CuttableLink {
    /// A link to the broker of `broker_url`; `url` is the same broker
    /// through the link.
    pub async fn start(broker_url: &str) -> CuttableLink {
        let uri: lapin::uri::AMQPUri = broker_url.parse().expect("AMQP url");
        let upstream = format!("{}:{}", uri.authority.host, uri.authority.port);
        let mut link = CuttableLink::tcp(&upstream).await;
        link.url = format!(
            "amqp://{}:{}@{}/{}",
            uri.authority.userinfo.username,
            uri.authority.userinfo.password,
            link.addr,
            uri.vhost.replace('/', "%2f")
        );
        link
    }

    /// A link to `upstream` (`host:port`), listening on `addr`.
    pub async fn tcp(upstream: &str) -> CuttableLink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let black_hole = Arc::new(AtomicBool::new(false));
        let stalled = Arc::new(AtomicBool::new(false));
        let (inner, hole, stall) = (tasks.clone(), black_hole.clone(), stalled.clone());
        let upstream = upstream.to_string();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (hole, stall) = (hole.clone(), stall.clone());
                let upstream = upstream.clone();
                let pipe = tokio::spawn(async move {
                    if hole.load(SeqCst) {
                        return swallow(client, &hole).await;
                    }
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    // Either side ending ends the connection.
                    tokio::select! {
                        _ = forward(cr, sw, &stall) => {}
                        _ = forward(sr, cw, &stall) => {}
                    }
                });
                inner.lock().unwrap().push(pipe.abort_handle());
            }
        });
        tasks.lock().unwrap().push(accept.abort_handle());
        CuttableLink {
            url: String::new(),
            addr,
            tasks,
            black_hole,
            stalled,
        }
    }

    /// The service is gone: connections dropped, the port closed.
    pub fn cut(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// From now on new connections are accepted and never answered
    /// (connections already forwarded keep working); `false` closes the
    /// swallowed ones, so their clients retry and get through.
    pub fn black_hole(&self, on: bool) {
        self.black_hole.store(on, SeqCst);
    }

    /// Every connection goes silent: what either side sends is dropped.
    /// `false` closes the connections that were silenced, so their clients
    /// reconnect (through the link, which forwards again).
    pub fn stall(&self, on: bool) {
        self.stalled.store(on, SeqCst);
    }
}

/// Copies `from` to `to` until either closes; while `stall` is set what
/// arrives is dropped, and a connection that was stalled ends when the
/// stall does.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stall: &AtomicBool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    let mut was_stalled = false;
    loop {
        let read = tokio::time::timeout(Duration::from_millis(100), from.read(&mut buf)).await;
        let stalled = stall.load(SeqCst);
        if was_stalled && !stalled {
            return;
        }
        was_stalled |= stalled;
        match read {
            Err(_) => continue,
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(n)) if !stalled => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// Reads and drops whatever a client sends, until it gives up or the
/// black hole is switched off.
async fn swallow(mut client: TcpStream, hole: &AtomicBool) {
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 4096];
    while hole.load(SeqCst) {
        let read = tokio::time::timeout(Duration::from_millis(100), client.read(&mut sink));
        if matches!(read.await, Ok(Ok(0) | Err(_))) {
            return;
        }
    }
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}
