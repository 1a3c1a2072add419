//! The rule set's Redis scripts, `lua/redis/`, by name (file stem). Scripts
//! the gateway runs for itself, not for the rules (the rollback's
//! `lua/shared/release.lua`), are compiled in instead (see `handoff`).
//!
//! They are part of a rule set: read and hashed with the rules, so a reload
//! picks up a changed script too. Each is a `redis::Script`, which calls
//! EVALSHA and, on NOSCRIPT (a restarted or failed-over Redis), loads the
//! source and retries — "loaded once, called by SHA".

use std::collections::BTreeMap;
use std::path::Path;

use redis::aio::ConnectionLike;
use redis::Value;

/// Why a script could not be called.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("no Redis script named `{0}` under lua/redis/")]
    Unknown(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Named scripts of one rule version.
#[derive(Default)]
pub struct ScriptSet {
    scripts: BTreeMap<String, redis::Script>,
}

/// The sliding-window limiter every rule set gets, even without the file.
pub const SLIDING_WINDOW: &str = "sliding_window";
const SLIDING_WINDOW_SOURCE: &str = include_str!("../../lua/redis/sliding_window.lua");

impl ScriptSet {
    /// Scripts from `(name, source)` pairs, plus the built-in limiter.
    pub fn new(sources: &BTreeMap<String, String>) -> ScriptSet {
        let mut scripts: BTreeMap<String, redis::Script> = sources
            .iter()
            .map(|(name, src)| (name.clone(), redis::Script::new(src)))
            .collect();
        scripts
            .entry(SLIDING_WINDOW.to_string())
            .or_insert_with(|| redis::Script::new(SLIDING_WINDOW_SOURCE));
        ScriptSet { scripts }
    }

    /// Reads every `*.lua` directly inside `dir` (missing dir = none).
    pub fn read_dir(dir: &Path) -> std::io::Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("lua") {
                continue;
            }
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                out.insert(stem.to_string(), std::fs::read_to_string(&path)?);
            }
        }
        Ok(out)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.scripts.keys().map(String::as_str)
    }

    /// Runs script `name` with `keys` and `args`.
    pub async fn call<C: ConnectionLike>(
        &self,
        conn: &mut C,
        name: &str,
        keys: &[String],
        args: &[String],
    ) -> Result<Value, ScriptError> {
        let script = self
            .scripts
            .get(name)
            .ok_or_else(|| ScriptError::Unknown(name.to_string()))?;
        let mut invocation = script.prepare_invoke();
        for k in keys {
            invocation.key(k);
        }
        for a in args {
            invocation.arg(a);
        }
        Ok(invocation.invoke_async(conn).await?)
    }
}
