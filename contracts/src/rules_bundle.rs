//! Rules bundles: a rules folder as one versioned, hashed value that every
//! gateway of a fleet loads, switched all-or-none.
//!
//! The store is the deployment's Redis (keys under `{rules}`, see
//! [`crate::keys::RulesKeys`]): every gateway already holds a connection to
//! it for admission, so distributing rules adds no new service to run,
//! secure or keep alive, and a bundle (a few KB of Lua) is small.
//!
//! The flow, driven by `seckillctl rules push|rollback`:
//! 1. **stage**: the bundle is stored under a new version and `staged` names
//!    it. Each gateway follows `staged`, compiles the bundle and runs its
//!    selftest without switching, and reports the outcome in its
//!    [`GatewayReport`].
//! 2. **switch** once every live gateway accepted: `active` names the
//!    version, every gateway swaps the prepared set in and reports the
//!    version it runs. If any live gateway refused, nothing switches and the
//!    refusals are the push's answer; the old version keeps serving.
//!
//! A gateway that starts (or comes back) loads `active` before it takes
//! traffic. Gateways poll these keys rather than subscribe: one MGET every
//! `gateway.bundles.poll_ms` cannot miss a message and survives a Redis
//! restart without any resubscription logic.

use std::collections::BTreeMap;
use std::path::Path;

pub use crate::clock::unix_ms;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A gateway counts as live while its last report is at most this old;
/// a push waits for live gateways only.
pub const LIVE_WITHIN_MS: u64 = 3_000;

/// The files of one rules folder: `*.lua` at the top (modules, by stem)
/// and `redis/*.lua` (Redis scripts, by stem).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFiles {
    pub modules: BTreeMap<String, String>,
    pub scripts: BTreeMap<String, String>,
}

impl RuleFiles {
    /// Reads a rules folder as a gateway does (other files are ignored).
    pub fn read_dir(dir: &Path) -> std::io::Result<RuleFiles> {
        let modules = read_lua(dir)?;
        let scripts_dir = dir.join("redis");
        let scripts = if scripts_dir.is_dir() {
            read_lua(&scripts_dir)?
        } else {
            BTreeMap::new()
        };
        Ok(RuleFiles { modules, scripts })
    }

    /// The content hash a gateway reports for this set (`/admin/rules`):
    /// equal hashes mean the same files, whatever their source.
    pub fn hash(&self) -> String {
        let mut hasher = Sha256::new();
        for (kind, map) in [("rule", &self.modules), ("redis", &self.scripts)] {
            for (name, text) in map {
                for part in [kind, name.as_str(), text.as_str()] {
                    hasher.update(part.as_bytes());
                    hasher.update([0]);
                }
            }
        }
        hex::encode(hasher.finalize())
    }
}

fn read_lua(dir: &Path) -> std::io::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if !path.is_file() || path.extension().and_then(|e| e.to_str()) != Some("lua") {
            continue;
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        out.insert(stem, std::fs::read_to_string(&path)?);
    }
    Ok(out)
}

/// One stored bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub version: u64,
    /// [`RuleFiles::hash`] of `files`.
    pub hash: String,
    /// Unix milliseconds of the push.
    pub pushed_at_ms: u64,
    pub files: RuleFiles,
}

/// What a gateway last did with a staged version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageOutcome {
    pub version: u64,
    /// `None`: compiled and passed its selftest; `Some`: why it was refused.
    pub error: Option<String>,
}

/// A gateway's report, rewritten every poll in the `gateways` hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayReport {
    pub id: String,
    /// The bundle version it runs (0: its local folder).
    pub version: u64,
    pub hash: String,
    /// Unix milliseconds.
    pub loaded_at_ms: u64,
    pub last_error: Option<String>,
    pub staged: Option<StageOutcome>,
    /// Unix milliseconds of this report.
    pub seen_at_ms: u64,
}

impl GatewayReport {
    /// Reported within [`LIVE_WITHIN_MS`] of `now_ms`.
    pub fn is_live(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.seen_at_ms) <= LIVE_WITHIN_MS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_follows_content_not_source() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("redis")).unwrap();
        std::fs::write(dir.path().join("main.lua"), "return {}").unwrap();
        std::fs::write(dir.path().join("redis/admit.lua"), "return 1").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let files = RuleFiles::read_dir(dir.path()).unwrap();
        assert_eq!(files.modules.keys().collect::<Vec<_>>(), ["main"]);
        assert_eq!(files.scripts.keys().collect::<Vec<_>>(), ["admit"]);
        let json = serde_json::to_string(&files).unwrap();
        let back: RuleFiles = serde_json::from_str(&json).unwrap();
        assert_eq!(back.hash(), files.hash());
        let mut other = files.clone();
        other.scripts.insert("admit".into(), "return 2".into());
        assert_ne!(other.hash(), files.hash());
        // A module and a script of the same name and text are different sets.
        let swapped = RuleFiles {
            modules: files.scripts.clone(),
            scripts: files.modules.clone(),
        };
        assert_ne!(swapped.hash(), files.hash());
    }

    #[test]
    fn liveness_is_by_report_age() {
        let r = GatewayReport {
            id: "g".into(),
            version: 1,
            hash: String::new(),
            loaded_at_ms: 0,
            last_error: None,
            staged: None,
            seen_at_ms: 10_000,
        };
        assert!(r.is_live(10_000 + LIVE_WITHIN_MS));
        assert!(!r.is_live(10_001 + LIVE_WITHIN_MS));
    }
}
