//! `seckillctl rules push|rollback|status`: rolling a rules bundle out to
//! every gateway, all or none (the protocol is `rules_bundle`'s).
//!
//! A push:
//! 1. **validates** the folder with the gateway binary itself
//!    (`seckill-gateway --check-rules DIR`), so what is refused here is what
//!    a gateway would refuse, with the same errors;
//! 2. **stores** it as the next version, unless it is the active bundle's
//!    content already (then nothing happens);
//! 3. **stages** it and waits until every live gateway reported its
//!    compile-and-selftest outcome. One refusal refuses the bundle
//!    everywhere: nothing switches, the refusals (per gateway) are the
//!    answer, and the old bundle keeps serving;
//! 4. **switches** `active` to it (and remembers the previous one in
//!    `history`, in the same atomic write), then waits until every live
//!    gateway runs it.
//!
//! A rollback is steps 3-4 for the version before the active one. One
//! rollout at a time: a Redis lock keeps two operators from staging over
//! each other.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use seckill_contracts::keys::{KeySchema, RulesKeys};
use seckill_contracts::redis_client::RedisConn;
use seckill_contracts::rules_bundle::{unix_ms, Bundle, GatewayReport, RuleFiles};
use serde::Serialize;

use crate::lock::{LockError, RedisLock};

/// How long a rollout lock outlives a coordinator that died mid-rollout.
const LOCK_TTL: Duration = Duration::from_secs(30);

/// Why a rollout did not happen (or did not finish).
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("another rules rollout is in progress")]
    Busy,
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("running {bin} --check-rules: {reason}")]
    Validator { bin: PathBuf, reason: String },
    #[error("the rules are refused: {0}")]
    Invalid(String),
    #[error("bundle {version} was refused by {} gateway(s); nothing switched", refusals.len())]
    Refused {
        version: u64,
        refusals: Vec<Refusal>,
    },
    #[error("gateways {waiting:?} did not report bundle {version} within {timeout:?}")]
    Timeout {
        version: u64,
        waiting: Vec<String>,
        timeout: Duration,
    },
    #[error("there is no earlier bundle to roll back to")]
    NoPrevious,
    #[error("bundle {0} is missing or corrupt")]
    BadBundle(u64),
}

/// One gateway's refusal of a staged bundle.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    pub gateway: String,
    pub error: String,
}

/// What a finished rollout did.
#[derive(Debug, Clone, Serialize)]
pub struct Rollout {
    pub version: u64,
    pub hash: String,
    /// False when the pushed content was already active.
    pub changed: bool,
    /// The gateways that switched (every live one).
    pub gateways: Vec<String>,
}

/// How to run a rollout.
pub struct RolloutOptions {
    /// The `seckill-gateway` binary used to validate a folder.
    pub gateway_bin: PathBuf,
    /// The config file the gateways run (for the validator's limits).
    pub config_path: Option<PathBuf>,
    /// How long to wait for the gateways at each step.
    pub timeout: Duration,
}

/// `rules push DIR`.
pub async fn push(
    redis: &mut RedisConn,
    keys: &KeySchema,
    dir: &Path,
    opts: &RolloutOptions,
) -> Result<Rollout, RolloutError> {
    validate(dir, opts).await?;
    let files = RuleFiles::read_dir(dir).map_err(|source| RolloutError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let guard = lock(redis, keys).await?;
    let result = push_locked(redis, &keys.rules(), files, opts.timeout).await;
    let _ = guard.release().await;
    result
}

async fn push_locked(
    redis: &mut RedisConn,
    rules: &RulesKeys,
    files: RuleFiles,
    timeout: Duration,
) -> Result<Rollout, RolloutError> {
    let hash = files.hash();
    if let Some(active) = active_bundle(redis, rules).await? {
        if active.hash == hash {
            return Ok(Rollout {
                version: active.version,
                hash,
                changed: false,
                gateways: live_reports(redis, rules)
                    .await?
                    .into_iter()
                    .map(|r| r.id)
                    .collect(),
            });
        }
    }
    let version: u64 = redis.incr(rules.seq(), 1).await?;
    let bundle = Bundle {
        version,
        hash,
        pushed_at_ms: unix_ms(),
        files,
    };
    let body = serde_json::to_string(&bundle).map_err(|e| RolloutError::Invalid(e.to_string()))?;
    let _: () = redis.set(rules.bundle(version), body).await?;
    roll_out(redis, rules, &bundle, Direction::Forward, timeout).await
}

/// `rules rollback`: back to the bundle that was active before this one.
pub async fn rollback(
    redis: &mut RedisConn,
    keys: &KeySchema,
    timeout: Duration,
) -> Result<Rollout, RolloutError> {
    let rules = keys.rules();
    let guard = lock(redis, keys).await?;
    let result = async {
        let previous: Option<u64> = redis.lindex(rules.history(), 0).await?;
        let previous = previous.ok_or(RolloutError::NoPrevious)?;
        let bundle = read_bundle(redis, &rules, previous).await?;
        roll_out(redis, &rules, &bundle, Direction::Back, timeout).await
    }
    .await;
    let _ = guard.release().await;
    result
}

/// `rules status`: the active version and every gateway's last report.
pub async fn status(
    redis: &mut RedisConn,
    keys: &KeySchema,
) -> Result<serde_json::Value, RolloutError> {
    let rules = keys.rules();
    let active: Option<u64> = redis.get(rules.active()).await?;
    let staged: Option<u64> = redis.get(rules.staged()).await?;
    let history: Vec<u64> = redis.lrange(rules.history(), 0, 9).await?;
    let now = unix_ms();
    let gateways: Vec<serde_json::Value> = reports(redis, &rules)
        .await?
        .into_iter()
        .map(|r| {
            let live = r.is_live(now);
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["live"] = live.into();
            v
        })
        .collect();
    Ok(serde_json::json!({
        "active": active,
        "staged": staged,
        "history": history,
        "gateways": gateways,
    }))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Forward,
    Back,
}

/// Stage, wait for every verdict, switch (all accepted) or stop (any refused).
async fn roll_out(
    redis: &mut RedisConn,
    rules: &RulesKeys,
    bundle: &Bundle,
    direction: Direction,
    timeout: Duration,
) -> Result<Rollout, RolloutError> {
    let version = bundle.version;
    let _: () = redis.set(rules.staged(), version).await?;
    let verdicts = wait_for(redis, rules, version, timeout, |r| {
        r.staged
            .as_ref()
            .filter(|s| s.version == version)
            .map(|s| s.error.clone())
    })
    .await?;
    let refusals: Vec<Refusal> = verdicts
        .into_iter()
        .filter_map(|(gateway, error)| error.map(|error| Refusal { gateway, error }))
        .collect();
    if !refusals.is_empty() {
        // Gateways that start later need not try the refused bundle.
        let active: Option<u64> = redis.get(rules.active()).await?;
        match active {
            Some(a) => redis.set::<_, _, ()>(rules.staged(), a).await?,
            None => redis.del::<_, ()>(rules.staged()).await?,
        }
        return Err(RolloutError::Refused { version, refusals });
    }
    switch(redis, rules, version, direction).await?;
    let switched = wait_for(redis, rules, version, timeout, |r| {
        (r.version == version).then_some(())
    })
    .await?;
    Ok(Rollout {
        version,
        hash: bundle.hash.clone(),
        changed: true,
        gateways: switched.into_iter().map(|(id, ())| id).collect(),
    })
}

/// `active` moves and `history` follows in one transaction: a push
/// remembers the version it replaces, a rollback consumes it.
async fn switch(
    redis: &mut RedisConn,
    rules: &RulesKeys,
    version: u64,
    direction: Direction,
) -> Result<(), RolloutError> {
    let old: Option<u64> = redis.get(rules.active()).await?;
    let mut pipe = redis::pipe();
    pipe.atomic().set(rules.active(), version).ignore();
    match (direction, old) {
        (Direction::Forward, Some(old)) => {
            pipe.lpush(rules.history(), old).ignore();
        }
        (Direction::Back, _) => {
            pipe.lpop(rules.history(), None).ignore();
        }
        (Direction::Forward, None) => {}
    }
    let _: () = pipe.query_async(redis).await?;
    Ok(())
}

/// Polls the reports until every live gateway has an answer (`answer`
/// returns `Some`); the answers by gateway id.
async fn wait_for<T>(
    redis: &mut RedisConn,
    rules: &RulesKeys,
    version: u64,
    timeout: Duration,
    answer: impl Fn(&GatewayReport) -> Option<T>,
) -> Result<Vec<(String, T)>, RolloutError> {
    let deadline = Instant::now() + timeout;
    loop {
        let live = live_reports(redis, rules).await?;
        let waiting: Vec<String> = live
            .iter()
            .filter(|r| answer(r).is_none())
            .map(|r| r.id.clone())
            .collect();
        if waiting.is_empty() {
            return Ok(live
                .iter()
                .filter_map(|r| Some((r.id.clone(), answer(r)?)))
                .collect());
        }
        if Instant::now() >= deadline {
            return Err(RolloutError::Timeout {
                version,
                waiting,
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn reports(
    redis: &mut RedisConn,
    rules: &RulesKeys,
) -> Result<Vec<GatewayReport>, RolloutError> {
    let raw: Vec<(String, String)> = redis.hgetall(rules.gateways()).await?;
    let mut out: Vec<GatewayReport> = raw
        .into_iter()
        .filter_map(|(_, body)| serde_json::from_str(&body).ok())
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

async fn live_reports(
    redis: &mut RedisConn,
    rules: &RulesKeys,
) -> Result<Vec<GatewayReport>, RolloutError> {
    let now = unix_ms();
    let mut all = reports(redis, rules).await?;
    all.retain(|r| r.is_live(now));
    Ok(all)
}

async fn active_bundle(
    redis: &mut RedisConn,
    rules: &RulesKeys,
) -> Result<Option<Bundle>, RolloutError> {
    let active: Option<u64> = redis.get(rules.active()).await?;
    match active {
        Some(v) => Ok(Some(read_bundle(redis, rules, v).await?)),
        None => Ok(None),
    }
}

async fn read_bundle(
    redis: &mut RedisConn,
    rules: &RulesKeys,
    version: u64,
) -> Result<Bundle, RolloutError> {
    let body: Option<String> = redis.get(rules.bundle(version)).await?;
    body.and_then(|b| serde_json::from_str(&b).ok())
        .ok_or(RolloutError::BadBundle(version))
}

async fn lock(redis: &RedisConn, keys: &KeySchema) -> Result<crate::lock::LockGuard, RolloutError> {
    RedisLock::new(redis.clone(), keys, "rules-rollout", LOCK_TTL)
        .try_acquire()
        .await?
        .ok_or(RolloutError::Busy)
}

/// `seckill-gateway --check-rules DIR`: the gateway's own verdict.
async fn validate(dir: &Path, opts: &RolloutOptions) -> Result<(), RolloutError> {
    let mut cmd = tokio::process::Command::new(&opts.gateway_bin);
    if let Some(config) = &opts.config_path {
        cmd.arg("--config").arg(config);
    }
    let out = cmd
        .arg("--check-rules")
        .arg(dir)
        .output()
        .await
        .map_err(|e| RolloutError::Validator {
            bin: opts.gateway_bin.clone(),
            reason: e.to_string(),
        })?;
    let verdict: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|_| RolloutError::Validator {
            bin: opts.gateway_bin.clone(),
            reason: format!(
                "no verdict (exit {:?}): {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })?;
    if verdict["ok"] == true {
        return Ok(());
    }
    Err(RolloutError::Invalid(
        verdict["error"].as_str().unwrap_or("refused").to_string(),
    ))
}
