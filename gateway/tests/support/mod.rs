//! Shared pieces of the gateway's integration tests: a real test upstream
//! that records what reached it, and a running gateway binary configured
//! through `SECKILL__*` variables.

#![allow(dead_code)]

pub mod cluster;
pub mod python_tools;
pub mod recovery;
pub mod stack;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::routing::any;
use axum::Router;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use seckill_contracts::config::{Config, PublicKeyConfig};
use seckill_contracts::testkit::{free_addr, wait_ok, Process, TestEnv, TestKeys};

/// What one request looked like when it reached an upstream.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    /// The connection it came on (the gateway's end of it).
    pub peer: SocketAddr,
}

/// A real HTTP upstream on loopback that answers 200 with its own name.
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    pub hits: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone)]
struct UpState {
    name: String,
    hits: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

async fn answer(
    State(s): State<UpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> String {
    if uri.path().ends_with("/slow") {
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    if uri.path() != "/healthz" {
        s.hits.fetch_add(1, Ordering::SeqCst);
        s.seen.lock().unwrap().push(Seen {
            method: method.to_string(),
            path: uri.path().to_string(),
            headers,
            peer,
        });
    }
    s.name.clone()
}

impl Upstream {
    /// Serves on its own thread and runtime, so [`Upstream::kill`] can drop
    /// every connection at once, as a crashed process would.
    pub async fn start(name: &str) -> Upstream {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = UpState {
            name: name.to_string(),
            hits: hits.clone(),
            seen: seen.clone(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                let app = Router::new()
                    .fallback(any(answer))
                    .with_state(state)
                    .into_make_service_with_connect_info::<SocketAddr>();
                tokio::select! {
                    _ = axum::serve(listener, app) => {}
                    _ = rx => {}
                }
            });
            // Dropping the runtime here kills every connection task too.
            rt.shutdown_background();
        });
        Upstream {
            addr,
            name: name.to_string(),
            hits,
            seen,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Stops serving and drops every connection: the backend is dead.
    pub async fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The RS256 key pair every test of this binary signs with (RSA key
/// generation is slow in debug builds, so once per binary).
pub fn keys() -> &'static TestKeys {
    static KEYS: OnceLock<TestKeys> = OnceLock::new();
    KEYS.get_or_init(|| TestKeys::generate("test-1"))
}

/// A valid token for `user_id` under `config`'s issuer and audience.
pub fn token(config: &Config, user_id: u64) -> String {
    keys().mint(&TestKeys::claims_for(
        user_id,
        &config.jwt.issuer,
        &config.jwt.audience,
        600,
    ))
}

/// Writes a rules folder: `main.lua` plus extra `(relative path, source)` files.
pub fn write_rules(dir: &Path, main: &str, extra: &[(&str, &str)]) {
    std::fs::create_dir_all(dir.join("redis")).unwrap();
    std::fs::write(dir.join("main.lua"), main).unwrap();
    for (name, src) in extra {
        std::fs::write(dir.join(name), src).unwrap();
    }
}

/// The config of a gateway in front of one upstream (named "a") with rules
/// that let every request through, written under `dir`.
pub async fn one_upstream_config(env: &TestEnv, dir: &Path) -> (Upstream, Config) {
    let rules = dir.join("lua");
    write_rules(&rules, "return { access = function(req) end }", &[]);
    let upstream = Upstream::start("a").await;
    let config = GatewayProc::config(env, &[upstream.addr], &rules);
    (upstream, config)
}

/// A gateway binary started for one test, from a config file it writes.
pub struct GatewayProc {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub admin_token: String,
    pub config: Config,
    pub config_path: PathBuf,
    pub process: Process,
}

impl GatewayProc {
    /// A config for a test gateway: fresh ports, `backends` in pool `api`,
    /// test JWT key, rules from `rules_dir`, the env's Redis prefix.
    pub fn config(env: &TestEnv, backends: &[SocketAddr], rules_dir: &Path) -> Config {
        let mut c = env.config.clone();
        let dir = rules_dir.parent().unwrap_or(rules_dir);
        let public = keys().write_public(dir);
        c.jwt.public_keys = vec![PublicKeyConfig {
            kid: keys().kid.clone(),
            path: public,
        }];
        c.jwt.signing_kid = keys().kid.clone();
        let g = &mut c.gateway;
        g.listen = free_addr();
        g.admin_listen = free_addr();
        g.admin_token = Some("test-admin-token".into());
        g.admin_token_path = None;
        g.rules_dir = rules_dir.to_path_buf();
        g.web_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../web");
        g.drain_secs = 3;
        if let Some(pool) = g.pools.get_mut("api") {
            pool.backends = backends.iter().map(|b| b.to_string()).collect();
            pool.health_interval_ms = 200;
        }
        // No wallet unless the test starts one (Stack does, with
        // `route_wallet`): no route to a wallet of some other stack on
        // this machine, and no health checks failing against nothing.
        g.pools.remove("wallet");
        g.routes.retain(|r| r.pool.as_deref() != Some("wallet"));
        c
    }

    /// Puts the default config's wallet pool (with `backend`) and route
    /// back into `config`, before the catch-all api route.
    pub fn route_wallet(config: &mut Config, backend: SocketAddr) {
        let defaults = Config::default().gateway;
        let g = &mut config.gateway;
        if let Some(mut pool) = defaults.pools.get("wallet").cloned() {
            pool.backends = vec![backend.to_string()];
            pool.health_interval_ms = 200;
            g.pools.insert("wallet".into(), pool);
        }
        let route = defaults
            .routes
            .into_iter()
            .find(|r| r.pool.as_deref() == Some("wallet"));
        if let Some(route) = route {
            let at = g
                .routes
                .iter()
                .position(|r| r.name == "api")
                .unwrap_or(g.routes.len());
            g.routes.insert(at, route);
        }
    }

    /// Starts the gateway binary on `config` and waits until it is healthy.
    pub async fn start(config: Config) -> GatewayProc {
        Self::launch(config, None).await
    }

    /// [`GatewayProc::start`] with the gateway's stderr (its log) written to
    /// `log`, for tests that count what the gateway logged. A shell `exec`s
    /// the binary, so [`Process::pid`] is still the gateway's own pid.
    pub async fn start_logged(config: Config, log: &Path) -> GatewayProc {
        Self::launch(config, Some(log)).await
    }

    async fn launch(config: Config, log: Option<&Path>) -> GatewayProc {
        let path = config
            .gateway
            .rules_dir
            .parent()
            .unwrap()
            .join(format!("gateway-{}.toml", config.gateway.listen.port()));
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
        let bin = env!("CARGO_BIN_EXE_seckill-gateway");
        let config_arg = path.to_str().unwrap();
        let env = [("RUST_LOG".into(), "warn,rules=info".into())];
        let process = match log {
            None => Process::spawn(bin, &["--config", config_arg], &env),
            Some(log) => Process::spawn(
                "sh",
                &[
                    "-c",
                    r#"exec "$0" --config "$1" 2>"$2""#,
                    bin,
                    config_arg,
                    log.to_str().unwrap(),
                ],
                &env,
            ),
        };
        let addr = config.gateway.listen;
        assert!(
            wait_ok(&format!("http://{addr}/healthz"), Duration::from_secs(30)).await,
            "gateway never became healthy"
        );
        GatewayProc {
            addr,
            admin: config.gateway.admin_listen,
            admin_token: config.gateway.admin_token.clone().unwrap_or_default(),
            config,
            config_path: path,
            process,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn token(&self, user_id: u64) -> String {
        token(&self.config, user_id)
    }

    /// `GET /admin/rules`.
    pub async fn rules_status(&self) -> serde_json::Value {
        self.admin_json("/admin/rules").await
    }

    /// `GET` an admin route with the admin token, as JSON.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        reqwest::Client::new()
            .get(self.admin_url(path))
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `POST /admin/rules/reload` → (status, body).
    pub async fn reload(&self) -> (u16, serde_json::Value) {
        let resp = reqwest::Client::new()
            .post(self.admin_url("/admin/rules/reload"))
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or_default())
    }

    pub async fn metrics(&self) -> String {
        reqwest::Client::new()
            .get(self.admin_url("/metrics"))
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}
