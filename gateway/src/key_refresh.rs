//! Keeping the verification keys current from the api's JWKS, so a key
//! rotation reaches every gateway without a restart.
//!
//! The keys in force are the configured ones (`jwt.public_keys`, trusted
//! until removed from the file) plus the last good key set fetched from
//! `gateway.jwks.urls`. Three things fetch:
//! - **startup**: before the gateway takes traffic; with no configured keys
//!   it waits (up to `startup_wait_ms`) for a first set, else it would
//!   answer every token with 401;
//! - **interval**: every `refresh_secs`, so withdrawn keys leave and new
//!   ones arrive ahead of their first token;
//! - **unknown kid**: a request whose token names a kid we lack waits for a
//!   fetch that ends after it arrived and is verified again, so a buyer
//!   holding a just-rotated token is served on its first request, even when
//!   the gateway's last fetch came a moment before the key was published.
//!
//! Every fetch passes one gate: at most one per `min_fetch_interval_ms`,
//! whatever triggered it. Requests that arrive while a fetch runs wait for
//! it instead of starting another; one that finds the gate shut waits for it
//! to open (so it waits at most one interval plus a fetch). A flood of
//! tokens with made-up kids costs the api at most one request per interval.
//! A failed fetch (api down, junk answer, a set with a broken key) changes
//! nothing: the last good set keeps serving, and `/admin/keys` and the
//! metrics say since when.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Serialize;

use crate::jwt::{configured_keys, JwtVerifier, VerifyKey};
use crate::metrics;
use seckill_contracts::clock::unix_secs;
use seckill_contracts::config::{Config, JwksConfig};
use seckill_contracts::jwks;

/// What started a fetch (the `trigger` label of the fetch metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Startup,
    Interval,
    UnknownKid,
}

impl Trigger {
    fn label(self) -> &'static str {
        match self {
            Trigger::Startup => "startup",
            Trigger::Interval => "interval",
            Trigger::UnknownKid => "unknown_kid",
        }
    }
}

/// Why a fetch brought no new key set.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
    #[error("{url}: {source}")]
    KeySet {
        url: String,
        source: jwks::JwksError,
    },
    #[error("the fetched keys cannot be used: {0}")]
    Install(#[from] crate::jwt::JwtSetupError),
    #[error("no JWKS address is configured")]
    NoUrls,
}

/// The refresh state `/admin/keys` shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KeyStatus {
    /// Kids that verify now.
    pub kids: Vec<String>,
    pub urls: Vec<String>,
    /// Unix seconds of the last fetch attempt and the last good one.
    pub last_fetch_at: Option<u64>,
    pub last_success_at: Option<u64>,
    /// The last failure, cleared by the next success.
    pub last_error: Option<String>,
    pub fetches: u64,
}

/// Why the gateway's verification could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KeySetupError {
    #[error(transparent)]
    Keys(#[from] crate::jwt::JwtSetupError),
    #[error("JWKS client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("no verification key: {0}")]
    NoFirstSet(#[from] FetchError),
    #[error("JWKS start-up runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// The verifier every proxy thread shares and its refresher, with the
/// first key set in place (blocking: runs before Pingora's runtimes exist).
pub fn build(config: &Config) -> Result<Arc<KeyRefresher>, KeySetupError> {
    let jwt = &config.jwt;
    let cache = config.gateway.jwt_cache_entries;
    let configured = configured_keys(jwt)?;
    let verifier = if configured.is_empty() {
        JwtVerifier::awaiting_keys(&jwt.issuer, &jwt.audience, jwt.leeway_secs, cache)?
    } else {
        JwtVerifier::with_keys(
            configured.clone(),
            &jwt.issuer,
            &jwt.audience,
            jwt.leeway_secs,
            cache,
        )?
    };
    let refresher = Arc::new(KeyRefresher::new(
        Arc::new(verifier),
        configured,
        config.gateway.jwks.clone(),
    )?);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(refresher.startup())?;
    Ok(refresher)
}

/// When the last fetch through the gate started and ended.
#[derive(Debug, Default)]
struct Gate {
    started: Option<Instant>,
    ended: Option<Instant>,
}

impl Gate {
    /// How long until the gate lets the next fetch start (zero: now).
    fn shut_for(&self, min: Duration) -> Duration {
        self.started
            .map_or(Duration::ZERO, |t| min.saturating_sub(t.elapsed()))
    }
}

/// Fetches key sets and installs them in the shared verifier.
pub struct KeyRefresher {
    verifier: Arc<JwtVerifier>,
    configured: Vec<VerifyKey>,
    config: JwksConfig,
    http: reqwest::Client,
    /// When the last fetch started and ended; held across the fetch, so
    /// concurrent triggers queue behind it instead of fetching again.
    gate: tokio::sync::Mutex<Gate>,
    status: Mutex<KeyStatus>,
}

impl KeyRefresher {
    /// A refresher for `verifier`, whose configured keys are `configured`.
    pub fn new(
        verifier: Arc<JwtVerifier>,
        configured: Vec<VerifyKey>,
        config: JwksConfig,
    ) -> Result<KeyRefresher, reqwest::Error> {
        let timeout = Duration::from_millis(config.fetch_timeout_ms);
        // A fresh connection per fetch: fetches are rare, and the callers
        // run on different runtimes (one per proxy thread), which pooled
        // connections must not straddle.
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(0)
            .build()?;
        let status = KeyStatus {
            kids: verifier.kids(),
            urls: config.urls.clone(),
            ..KeyStatus::default()
        };
        metrics::JWT_KEYS.set(status.kids.len() as i64);
        Ok(KeyRefresher {
            verifier,
            configured,
            config,
            http,
            gate: tokio::sync::Mutex::new(Gate::default()),
            status: Mutex::new(status),
        })
    }

    /// The verifier the refreshed keys go into.
    pub fn verifier(&self) -> &Arc<JwtVerifier> {
        &self.verifier
    }

    /// Whether any JWKS address is configured.
    pub fn enabled(&self) -> bool {
        !self.config.urls.is_empty()
    }

    /// The state for `/admin/keys`.
    pub fn status(&self) -> KeyStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Called when a token names a kid the verifier lacks: returns once a
    /// fetch has ended after this call began (the one running now, or the
    /// next the gate allows, which this call makes unless another waiter
    /// does). The caller verifies again afterwards either way.
    ///
    /// Waiting for a fetch that merely *started* earlier is not enough: the
    /// interval fetch may have read the api a moment before the key was
    /// published, and refusing the token then would 401 a buyer whose token
    /// is good.
    pub async fn on_unknown_kid(&self) {
        if !self.enabled() {
            return;
        }
        let arrived = Instant::now();
        let min = self.min_interval();
        loop {
            let wait = {
                let mut gate = self.gate.lock().await;
                if gate.ended.is_some_and(|t| t >= arrived) {
                    return;
                }
                let wait = gate.shut_for(min);
                if wait.is_zero() {
                    let _ = self.fetch_through(&mut gate, Trigger::UnknownKid).await;
                    return;
                }
                wait
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// One fetch through the gate; `Ok(false)` when the gate said "too soon".
    pub async fn fetch_gated(&self, trigger: Trigger) -> Result<bool, FetchError> {
        let mut gate = self.gate.lock().await;
        if !gate.shut_for(self.min_interval()).is_zero() {
            return Ok(false);
        }
        self.fetch_through(&mut gate, trigger).await.map(|()| true)
    }

    /// The first key set, before traffic. With configured keys one failed
    /// attempt is only logged; without, it retries until `startup_wait_ms`.
    pub async fn startup(&self) -> Result<(), FetchError> {
        if !self.enabled() {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_millis(self.config.startup_wait_ms);
        loop {
            let wait = self.gate.lock().await.shut_for(self.min_interval());
            tokio::time::sleep(wait).await;
            match self.fetch_gated(Trigger::Startup).await {
                Ok(true) => return Ok(()),
                Ok(false) => continue,
                Err(e) if !self.configured.is_empty() => {
                    tracing::warn!(error = %e, "no JWKS at start; serving the configured keys");
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(e) => tracing::warn!(error = %e, "waiting for a first JWKS"),
            }
        }
    }

    fn min_interval(&self) -> Duration {
        Duration::from_millis(self.config.min_fetch_interval_ms)
    }

    /// A fetch by the holder of the gate, which records when it ran.
    async fn fetch_through(&self, gate: &mut Gate, trigger: Trigger) -> Result<(), FetchError> {
        gate.started = Some(Instant::now());
        let result = self.fetch_and_install().await;
        gate.ended = Some(Instant::now());
        self.record(trigger, &result);
        result
    }

    /// Tries each address in order; the first usable set is installed.
    async fn fetch_and_install(&self) -> Result<(), FetchError> {
        let mut last_error = FetchError::NoUrls;
        for url in &self.config.urls {
            match self.fetch(url).await {
                Ok(fetched) => return self.install(fetched),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    async fn fetch(&self, url: &str) -> Result<Vec<VerifyKey>, FetchError> {
        let http = |reason: String| FetchError::Http {
            url: url.to_string(),
            reason,
        };
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| http(e.to_string()))?;
        if !response.status().is_success() {
            return Err(http(format!("answered {}", response.status())));
        }
        let body = response.bytes().await.map_err(|e| http(e.to_string()))?;
        jwks::parse(&body, url).map_err(|source| FetchError::KeySet {
            url: url.to_string(),
            source,
        })
    }

    /// Configured keys first; a fetched key under a configured kid is
    /// ignored (the file wins), with a warning if it is a different key.
    fn install(&self, fetched: Vec<VerifyKey>) -> Result<(), FetchError> {
        let mut keys = self.configured.clone();
        for key in fetched {
            match self.configured.iter().find(|k| k.kid() == key.kid()) {
                Some(mine) if !mine.same_key(&key) => tracing::warn!(
                    kid = key.kid(),
                    "the JWKS has another key under a configured kid; keeping the configured one"
                ),
                Some(_) => {}
                None => keys.push(key),
            }
        }
        let change = self.verifier.replace_keys(keys)?;
        if !change.is_empty() {
            tracing::info!(added = ?change.added, removed = ?change.removed, "verification keys refreshed");
        }
        Ok(())
    }

    fn record(&self, trigger: Trigger, result: &Result<(), FetchError>) {
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::JWKS_FETCHES
            .with_label_values(&[trigger.label(), outcome])
            .inc();
        let now = unix_secs();
        let kids = self.verifier.kids();
        metrics::JWT_KEYS.set(kids.len() as i64);
        if let Err(e) = result {
            tracing::warn!(trigger = trigger.label(), error = %e, "JWKS refresh failed; the last good keys stay");
        }
        if let Ok(mut status) = self.status.lock() {
            status.kids = kids;
            status.fetches += 1;
            status.last_fetch_at = Some(now);
            match result {
                Ok(()) => {
                    status.last_success_at = Some(now);
                    status.last_error = None;
                }
                Err(e) => status.last_error = Some(e.to_string()),
            }
        }
    }
}

/// The interval refresh as a Pingora background service.
pub struct KeyRefreshService(pub Arc<KeyRefresher>);

#[async_trait]
impl BackgroundService for KeyRefreshService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if !self.0.enabled() {
            return;
        }
        let period = Duration::from_secs(self.0.config.refresh_secs);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.changed() => return,
            }
            let _ = self.0.fetch_gated(Trigger::Interval).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use seckill_contracts::testkit::TestKeys;
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
    use std::sync::OnceLock;

    fn key(n: usize) -> &'static TestKeys {
        static K: OnceLock<Vec<TestKeys>> = OnceLock::new();
        &K.get_or_init(|| vec![TestKeys::generate("a"), TestKeys::generate("b")])[n]
    }

    fn verify_key(k: &TestKeys) -> VerifyKey {
        VerifyKey::from_pem(&k.kid, "test", k.public_pem.as_bytes()).unwrap()
    }

    /// A JWKS endpoint serving `b`'s key (or the status set in `fail`),
    /// counting requests.
    struct Jwks {
        url: String,
        hits: Arc<AtomicUsize>,
        fail: Arc<AtomicU16>,
    }

    async fn serve_jwks() -> Jwks {
        let hits = Arc::new(AtomicUsize::new(0));
        let fail = Arc::new(AtomicU16::new(0));
        let doc = jwks::document([&verify_key(key(1))]).to_string();
        let (h, f) = (hits.clone(), fail.clone());
        let app = axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || {
                let (h, f, doc) = (h.clone(), f.clone(), doc.clone());
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    match f.load(Ordering::SeqCst) {
                        0 => (axum::http::StatusCode::OK, doc),
                        code => (
                            axum::http::StatusCode::from_u16(code).unwrap(),
                            "down".to_string(),
                        ),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Jwks { url, hits, fail }
    }

    fn refresher(url: &str, min_fetch_ms: u64) -> Arc<KeyRefresher> {
        let verifier =
            JwtVerifier::with_keys(vec![verify_key(key(0))], "iss", "aud", 5, 100).unwrap();
        let config = JwksConfig {
            urls: vec!["http://127.0.0.1:9/unreachable".into(), url.to_string()],
            min_fetch_interval_ms: min_fetch_ms,
            fetch_timeout_ms: 1_000,
            ..JwksConfig::default()
        };
        Arc::new(KeyRefresher::new(Arc::new(verifier), vec![verify_key(key(0))], config).unwrap())
    }

    /// `n` requests with an unknown kid at once; returns when all have.
    async fn unknown_kids_at_once(keys: &Arc<KeyRefresher>, n: usize) {
        let waits: Vec<_> = (0..n)
            .map(|_| {
                let keys = keys.clone();
                tokio::spawn(async move { keys.on_unknown_kid().await })
            })
            .collect();
        for w in waits {
            w.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_burst_of_unknown_kids_makes_one_fetch() {
        let jwks = serve_jwks().await;
        let keys = refresher(&jwks.url, 60_000);
        unknown_kids_at_once(&keys, 50).await;
        assert_eq!(jwks.hits.load(Ordering::SeqCst), 1);
        // Every waiter returns after the one fetch, with the new key in.
        assert_eq!(keys.verifier().kids(), ["a", "b"]);
        assert_eq!(keys.status().fetches, 1);
    }

    #[tokio::test]
    async fn the_gate_opens_again_after_its_interval() {
        let jwks = serve_jwks().await;
        let keys = refresher(&jwks.url, 200);
        assert!(keys.fetch_gated(Trigger::Interval).await.unwrap());
        assert!(!keys.fetch_gated(Trigger::UnknownKid).await.unwrap());
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(keys.fetch_gated(Trigger::UnknownKid).await.unwrap());
        assert_eq!(jwks.hits.load(Ordering::SeqCst), 2);
    }

    /// The interval fetch read the api just before the key was published:
    /// a token carrying it waits for the gate to open and is served then,
    /// and the other tokens that came meanwhile share that one fetch.
    #[tokio::test]
    async fn an_unknown_kid_after_a_stale_fetch_waits_for_the_next_one() {
        let jwks = serve_jwks().await;
        let keys = refresher(&jwks.url, 300);
        jwks.fail.store(503, Ordering::SeqCst);
        assert!(keys.fetch_gated(Trigger::Interval).await.is_err());
        jwks.fail.store(0, Ordering::SeqCst);
        let asked = Instant::now();
        unknown_kids_at_once(&keys, 20).await;
        let waited = asked.elapsed();
        assert_eq!(keys.verifier().kids(), ["a", "b"]);
        assert_eq!(jwks.hits.load(Ordering::SeqCst), 2, "one stale, one fresh");
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
            "waited {waited:?} for a 300 ms gate"
        );
    }

    #[tokio::test]
    async fn a_failed_fetch_keeps_the_last_good_set() {
        let jwks = serve_jwks().await;
        let keys = refresher(&jwks.url, 1);
        keys.fetch_gated(Trigger::Interval).await.unwrap();
        jwks.fail.store(503, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let err = keys.fetch_gated(Trigger::Interval).await.unwrap_err();
        assert!(err.to_string().contains("503"), "{err}");
        assert_eq!(keys.verifier().kids(), ["a", "b"]);
        let status = keys.status();
        assert!(status.last_error.is_some() && status.last_success_at.is_some());
    }

    #[tokio::test]
    async fn a_configured_kid_keeps_its_configured_key() {
        let jwks = serve_jwks().await;
        let verifier =
            JwtVerifier::with_keys(vec![verify_key(key(0))], "iss", "aud", 5, 100).unwrap();
        // Configured under kid "b": the JWKS's different "b" must not replace it.
        let mine = VerifyKey::from_pem("b", "test", key(0).public_pem.as_bytes()).unwrap();
        let config = JwksConfig {
            urls: vec![jwks.url.clone()],
            ..JwksConfig::default()
        };
        let keys = KeyRefresher::new(Arc::new(verifier), vec![mine.clone()], config).unwrap();
        keys.fetch_gated(Trigger::Interval).await.unwrap();
        let token = key(1).mint(&TestKeys::claims_for(1, "iss", "aud", 60));
        assert_eq!(
            keys.verifier().verify(&token).unwrap_err(),
            crate::jwt::JwtRejection::BadSignature
        );
    }
}
