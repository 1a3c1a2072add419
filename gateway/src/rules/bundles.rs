//! Following the fleet's rules bundles (`seckill_contracts::rules_bundle`):
//! prepare what is staged, switch to what is active, report either way.
//!
//! Every `gateway.bundles.poll_ms` the follower reads `staged` and `active`
//! in one MGET:
//! - a newly **staged** version is fetched, compiled and selftested on a
//!   blocking thread (the proxy threads keep serving the current set) and
//!   kept prepared; the outcome goes into this gateway's report, which is
//!   what `seckillctl rules push` waits for;
//! - a newly **active** version is swapped in: the prepared set if it is
//!   that version, else (a rollback, a gateway that missed the stage) it is
//!   prepared now. A version that fails here keeps the current set and is
//!   not retried until `active` changes again;
//! - the **report** (version, hash, loaded_at, last error, stage outcome,
//!   time) is written to the `gateways` hash, so a push can tell who is live.
//!
//! Start-up is [`load_active`]: the active bundle, read before the gateway
//! takes traffic.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use redis::AsyncCommands;
use seckill_contracts::config::{BundlesConfig, Config, RedisConfig};
use seckill_contracts::keys::{KeySchema, RulesKeys};
use seckill_contracts::redis_client::RedisConn;
use seckill_contracts::rules_bundle::{unix_ms, Bundle, GatewayReport, StageOutcome};

use super::{RuleEngine, RuleError, RuleSet};

/// Why a bundle could not be read from Redis.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("bundle {0} is missing from Redis")]
    Missing(u64),
    #[error("bundle {version} is not a bundle: {source}")]
    Corrupt {
        version: u64,
        source: serde_json::Error,
    },
}

/// Reads bundle `version`.
pub async fn fetch(
    redis: &mut RedisConn,
    keys: &RulesKeys,
    version: u64,
) -> Result<Bundle, BundleError> {
    let body: Option<String> = redis.get(keys.bundle(version)).await?;
    let body = body.ok_or(BundleError::Missing(version))?;
    serde_json::from_str(&body).map_err(|source| BundleError::Corrupt { version, source })
}

/// The active bundle at start-up, retried until `startup_wait_ms`; `None`
/// when none was ever pushed, or Redis could not be reached in time (then
/// the gateway starts on its folder and the follower switches later).
pub async fn load_active(config: &Config) -> Option<Bundle> {
    let keys = KeySchema::new(config.redis.key_prefix.clone()).rules();
    let wait = Duration::from_millis(config.gateway.bundles.startup_wait_ms);
    let deadline = Instant::now() + wait;
    loop {
        match read_active(&config.redis, &keys).await {
            Ok(found) => return found,
            Err(e) if Instant::now() >= deadline => {
                tracing::error!(error = %e, "cannot read the active rules bundle; starting on the rules folder");
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "waiting for Redis to read the active rules bundle");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn read_active(redis: &RedisConfig, keys: &RulesKeys) -> Result<Option<Bundle>, BundleError> {
    let mut conn = RedisConn::connect(redis).await?;
    let active: Option<u64> = conn.get(keys.active()).await?;
    match active {
        Some(v) => Ok(Some(fetch(&mut conn, keys, v).await?)),
        None => Ok(None),
    }
}

/// What the follower remembers between polls.
#[derive(Default)]
struct FollowState {
    /// The bundle version running (`None`: the local folder).
    running: Option<u64>,
    staged: Option<StageOutcome>,
    prepared: Option<RuleSet>,
    /// An active version that failed here; not retried until `active` moves.
    refused_active: Option<u64>,
}

/// The background follower.
pub struct BundleFollower {
    engine: Arc<RuleEngine>,
    redis: RedisConfig,
    keys: RulesKeys,
    id: String,
    poll: Duration,
    state: Mutex<FollowState>,
}

impl BundleFollower {
    /// A follower for `engine`, which runs bundle `running` (if any) now.
    pub fn new(engine: Arc<RuleEngine>, config: &Config, running: Option<u64>) -> BundleFollower {
        BundleFollower {
            engine,
            redis: config.redis.clone(),
            keys: KeySchema::new(config.redis.key_prefix.clone()).rules(),
            id: gateway_id(&config.gateway.bundles, config.gateway.listen.port()),
            poll: Duration::from_millis(config.gateway.bundles.poll_ms),
            state: Mutex::new(FollowState {
                running,
                ..FollowState::default()
            }),
        }
    }

    /// One poll: prepare, switch, report.
    async fn tick(&self, redis: &mut RedisConn) -> Result<(), BundleError> {
        let (staged, active): (Option<u64>, Option<u64>) = redis::cmd("MGET")
            .arg(self.keys.staged())
            .arg(self.keys.active())
            .query_async(redis)
            .await?;
        if let Some(v) = staged.filter(|v| !self.staged_already(*v)) {
            self.stage(redis, v).await?;
        }
        if let Some(v) = active.filter(|v| self.should_switch(*v)) {
            self.switch(redis, v).await?;
        }
        self.report(redis).await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FollowState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn staged_already(&self, version: u64) -> bool {
        self.lock()
            .staged
            .as_ref()
            .is_some_and(|s| s.version == version)
    }

    fn should_switch(&self, version: u64) -> bool {
        let state = self.lock();
        state.running != Some(version) && state.refused_active != Some(version)
    }

    async fn stage(&self, redis: &mut RedisConn, version: u64) -> Result<(), BundleError> {
        let outcome = match self.fetch_and_compile(redis, version).await? {
            Ok(set) => {
                tracing::info!(version, "rules bundle staged: compiled and selftested");
                self.lock().prepared = Some(set);
                StageOutcome {
                    version,
                    error: None,
                }
            }
            Err(e) => {
                self.engine.record_refusal("bundle_stage", &e);
                StageOutcome {
                    version,
                    error: Some(e.to_string()),
                }
            }
        };
        self.lock().staged = Some(outcome);
        Ok(())
    }

    async fn switch(&self, redis: &mut RedisConn, version: u64) -> Result<(), BundleError> {
        let prepared = {
            let mut state = self.lock();
            match state.prepared.take() {
                Some(set) if set.version == version => Some(set),
                other => {
                    state.prepared = other;
                    None
                }
            }
        };
        let set = match prepared {
            Some(set) => Ok(set),
            None => self.fetch_and_compile(redis, version).await?,
        };
        match set {
            Ok(set) => {
                self.engine.install(set, "bundle");
                let mut state = self.lock();
                state.running = Some(version);
                state.refused_active = None;
            }
            Err(e) => {
                self.engine.record_refusal("bundle_switch", &e);
                self.lock().refused_active = Some(version);
            }
        }
        Ok(())
    }

    /// The bundle compiled; a missing or corrupt bundle is a refusal like a
    /// compile error (the outer error is Redis being unreachable).
    async fn fetch_and_compile(
        &self,
        redis: &mut RedisConn,
        version: u64,
    ) -> Result<Result<RuleSet, RuleError>, BundleError> {
        match fetch(redis, &self.keys, version).await {
            Ok(bundle) => Ok(self.compile(bundle).await),
            Err(BundleError::Redis(e)) => Err(BundleError::Redis(e)),
            Err(other) => Ok(Err(RuleError::Invalid(other.to_string()))),
        }
    }

    /// Compiles on a blocking thread: building VMs and running a selftest
    /// must not stall the runtime this follower shares.
    async fn compile(&self, bundle: Bundle) -> Result<RuleSet, RuleError> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.prepare(bundle.files, bundle.version))
            .await
            .unwrap_or_else(|e| Err(RuleError::Invalid(format!("compile task failed: {e}"))))
    }

    async fn report(&self, redis: &mut RedisConn) -> Result<(), BundleError> {
        let status = self.engine.status();
        let (running, staged) = {
            let state = self.lock();
            (state.running, state.staged.clone())
        };
        let report = GatewayReport {
            id: self.id.clone(),
            version: running.unwrap_or(0),
            hash: status.hash,
            loaded_at_ms: status.loaded_at.timestamp_millis().max(0) as u64,
            last_error: status.last_error,
            staged,
            seen_at_ms: unix_ms(),
        };
        let body = serde_json::to_string(&report).unwrap_or_default();
        let _: () = redis.hset(self.keys.gateways(), &self.id, body).await?;
        Ok(())
    }
}

#[async_trait]
impl BackgroundService for BundleFollower {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut conn: Option<RedisConn> = None;
        let mut failing_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.poll) => {}
                _ = shutdown.changed() => return,
            }
            if conn.is_none() {
                conn = RedisConn::connect(&self.redis).await.ok();
            }
            let Some(c) = conn.as_mut() else { continue };
            match self.tick(c).await {
                Ok(()) => failing_since = None,
                Err(e) => {
                    // Once per failure streak, not once per poll.
                    if failing_since.is_none() {
                        tracing::warn!(error = %e, "rules bundle poll failed; retrying");
                        failing_since = Some(Instant::now());
                    }
                    if matches!(e, BundleError::Redis(_)) {
                        conn = None;
                    }
                }
            }
        }
    }
}

/// `gateway.bundles.id`, or `<hostname>:<listen port>`.
pub(crate) fn gateway_id(config: &BundlesConfig, port: u16) -> String {
    if !config.id.is_empty() {
        return config.id.clone();
    }
    seckill_contracts::fleet::host_id(port)
}
