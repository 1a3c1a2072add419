//! Shared pieces of the gateway's integration tests: a real test upstream
//! that records what reached it, and a running gateway binary configured
//! through `SECKILL__*` variables.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::routing::any;
use axum::Router;
use seckill_contracts::testkit::{free_addr, wait_ok, Process};

/// What one request looked like when it reached an upstream.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
}

/// A real HTTP upstream on loopback that answers 200 with its own name.
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    pub hits: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Clone)]
struct UpState {
    name: String,
    hits: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

async fn answer(State(s): State<UpState>, method: Method, uri: Uri, headers: HeaderMap) -> String {
    if uri.path() != "/healthz" {
        s.hits.fetch_add(1, Ordering::SeqCst);
        s.seen.lock().unwrap().push(Seen {
            method: method.to_string(),
            path: uri.path().to_string(),
            headers,
        });
    }
    s.name.clone()
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        Self::serve(name, listener, addr).await
    }

    async fn serve(name: &str, listener: tokio::net::TcpListener, addr: SocketAddr) -> Upstream {
        let hits = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = UpState {
            name: name.to_string(),
            hits: hits.clone(),
            seen: seen.clone(),
        };
        let app = Router::new().fallback(any(answer)).with_state(state);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Upstream {
            addr,
            name: name.to_string(),
            hits,
            seen,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops serving and closes the listener: the backend is dead.
    pub async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        self.stop.take();
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A gateway binary started for one test.
pub struct GatewayProc {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub admin_token: String,
    pub process: Process,
    _dir: tempfile::TempDir,
}

impl GatewayProc {
    /// Starts the gateway with `backends` in its `api` pool and extra env.
    pub async fn start(backends: &[SocketAddr], extra: &[(String, String)]) -> GatewayProc {
        let dir = tempfile::tempdir().unwrap();
        let addr = free_addr();
        let admin = free_addr();
        let token = "test-admin-token".to_string();
        let list = backends
            .iter()
            .map(|b| format!("\"{b}\""))
            .collect::<Vec<_>>()
            .join(",");
        let mut env: Vec<(String, String)> = vec![
            ("SECKILL__GATEWAY__LISTEN".into(), addr.to_string()),
            ("SECKILL__GATEWAY__ADMIN_LISTEN".into(), admin.to_string()),
            ("SECKILL__GATEWAY__ADMIN_TOKEN".into(), token.clone()),
            (
                "SECKILL__GATEWAY__POOLS__API__BACKENDS".into(),
                format!("[{list}]"),
            ),
            (
                "SECKILL__GATEWAY__POOLS__API__HEALTH_INTERVAL_MS".into(),
                "200".into(),
            ),
            ("SECKILL__GATEWAY__DRAIN_SECS".into(), "2".into()),
        ];
        env.extend_from_slice(extra);
        let process = Process::spawn(env!("CARGO_BIN_EXE_seckill-gateway"), &[], &env);
        assert!(
            wait_ok(&format!("http://{addr}/healthz"), Duration::from_secs(20)).await,
            "gateway never became healthy"
        );
        GatewayProc {
            addr,
            admin,
            admin_token: token,
            process,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
}
