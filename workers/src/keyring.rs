//! The api's signing keys over time: rotation without restarting anything.
//!
//! A keyring is a folder (`jwt.keyring_dir`) holding `<kid>.private.pem`,
//! `<kid>.public.pem` and a manifest, `keyring.json`, that says from when
//! each key signs. `seckillctl keys rotate` adds a key whose signing starts
//! `jwt.publish_ahead_secs` later; in between it is only published, so every
//! api instance (each rereads the folder every `jwt.keyring_reload_secs`)
//! and every gateway (each refreshes from the JWKS) knows it before the
//! first token carrying it exists.
//!
//! What is in force at a moment `now` is a pure function of the manifest
//! ([`Manifest::in_force`]), so every instance that reads the same folder
//! agrees without talking to the others:
//! - **signs**: the entry with the latest `signs_from` not after `now`;
//! - **verifies**: every entry except the retired ones: a key is retired once
//!   a later key has been signing for longer than a token lives (`ttl_secs +
//!   leeway_secs`), because no unexpired token can carry it any more.
//!
//! Keys named in the config file (`jwt.public_keys`, `jwt.signing_kid`) stay
//! trusted until they are removed from the file; the keyring only adds to
//! them, and its current key replaces the configured signer. A deployment
//! with several api hosts shares the folder (a read-only mount, or a copy
//! pushed by its config management); the private keys never leave it.

use std::fs;
use std::path::{Path, PathBuf};

use seckill_contracts::config::JwtConfig;
use seckill_contracts::jwt::{configured_keys, JwtSetupError, VerifyKey};
use serde::{Deserialize, Serialize};

use crate::signing_keys::{self, KeyGenError};
use crate::tokens::{TokenError, TokenSigner};

/// The manifest's file name inside the keyring folder.
pub const MANIFEST: &str = "keyring.json";

/// Why the keyring could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("jwt.keyring_dir is not set: there is no keyring to rotate")]
    NotConfigured,
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a keyring manifest: {source}")]
    Manifest {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no key signs yet: neither the keyring nor jwt.private_key_path has one")]
    NoSigner,
    #[error("kid {0:?} is already in the keyring")]
    KidTaken(String),
    #[error(transparent)]
    Generate(#[from] KeyGenError),
    #[error(transparent)]
    Verify(#[from] JwtSetupError),
    #[error(transparent)]
    Sign(#[from] TokenError),
}

/// One key of the keyring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub kid: String,
    /// Unix seconds the key was made.
    pub created_at: u64,
    /// Unix seconds from which the api signs with it.
    pub signs_from: u64,
}

/// `keyring.json`: the keys in the order they were added.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub keys: Vec<Entry>,
}

/// What the manifest puts in force at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InForce<'a> {
    /// The key to sign with, if any has started signing.
    pub signer: Option<&'a Entry>,
    /// Every key a token may still carry (or soon will).
    pub verifying: Vec<&'a Entry>,
    /// Keys no unexpired token can carry: safe to delete.
    pub retired: Vec<&'a Entry>,
}

impl Manifest {
    /// The manifest in `dir`; a folder without one is an empty keyring.
    pub fn read(dir: &Path) -> Result<Manifest, KeyringError> {
        let path = dir.join(MANIFEST);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| KeyringError::Manifest { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest::default()),
            Err(source) => Err(KeyringError::Read { path, source }),
        }
    }

    /// Which keys sign, verify and are retired at `now`, for tokens that
    /// live `token_lifetime_secs` (ttl plus leeway).
    pub fn in_force(&self, now: u64, token_lifetime_secs: u64) -> InForce<'_> {
        let signer = self
            .keys
            .iter()
            .filter(|e| e.signs_from <= now)
            .max_by_key(|e| e.signs_from);
        let (retired, verifying) = self.keys.iter().partition(|e| {
            self.keys.iter().any(|later| {
                later.signs_from > e.signs_from
                    && now > later.signs_from.saturating_add(token_lifetime_secs)
            })
        });
        InForce {
            signer,
            verifying,
            retired,
        }
    }

    /// Writes the manifest through a temporary file and a rename, so a
    /// reader never sees half of it.
    fn write(&self, dir: &Path) -> Result<(), KeyringError> {
        let path = dir.join(MANIFEST);
        let tmp = dir.join(format!("{MANIFEST}.tmp"));
        let body = serde_json::to_vec_pretty(self).map_err(|source| KeyringError::Manifest {
            path: path.clone(),
            source,
        })?;
        let write = |p: &Path| {
            let p = p.to_path_buf();
            move |source| KeyringError::Write { path: p, source }
        };
        fs::write(&tmp, body).map_err(write(&tmp))?;
        fs::rename(&tmp, &path).map_err(write(&path))
    }
}

/// Everything an api instance takes from the config and the keyring.
pub struct Loaded {
    /// `None` when no key can sign (login then answers 503).
    pub signer: Option<TokenSigner>,
    pub verifying: Vec<VerifyKey>,
}

/// The keys in force now: the configured ones plus the keyring's.
pub fn load(config: &JwtConfig, now: u64) -> Result<Loaded, KeyringError> {
    let mut verifying = configured_keys(config)?;
    let mut signer = None;
    if let Some(dir) = &config.keyring_dir {
        let manifest = Manifest::read(dir)?;
        let in_force = manifest.in_force(now, token_lifetime(config));
        for entry in &in_force.verifying {
            // A kid the config file already names keeps its configured key.
            if verifying.iter().all(|k| k.kid() != entry.kid) {
                verifying.push(read_public(dir, &entry.kid)?);
            }
        }
        if let Some(entry) = in_force.signer {
            let pem = read(&dir.join(private_file(&entry.kid)))?;
            signer = Some(TokenSigner::from_pem(config, &entry.kid, &pem)?);
        }
    }
    if signer.is_none() {
        signer = TokenSigner::from_config(config)
            .inspect_err(|e| tracing::warn!(error = %e, "no configured signing key"))
            .ok();
    }
    Ok(Loaded { signer, verifying })
}

/// The key the api signs with right now, for tokens minted outside the
/// api (`seckillctl token`, the demo, the bench).
pub fn current_signer(config: &JwtConfig, now: u64) -> Result<TokenSigner, KeyringError> {
    if config.keyring_dir.is_none() {
        return Ok(TokenSigner::from_config(config)?);
    }
    load(config, now)?.signer.ok_or(KeyringError::NoSigner)
}

/// What a rotation did.
#[derive(Debug, Clone, Serialize)]
pub struct Rotation {
    pub added: Entry,
    /// Kids deleted because no unexpired token can carry them.
    pub pruned: Vec<String>,
    /// The manifest after the rotation.
    pub keys: Vec<Entry>,
}

/// Adds a new key (named `kid`, or `k<now>`) that signs from `now +
/// jwt.publish_ahead_secs`, and deletes retired keys. Run by
/// `seckillctl keys rotate` on the keyring folder.
pub fn rotate(config: &JwtConfig, kid: Option<&str>, now: u64) -> Result<Rotation, KeyringError> {
    let dir = config
        .keyring_dir
        .as_deref()
        .ok_or(KeyringError::NotConfigured)?;
    let mut manifest = Manifest::read(dir)?;
    let kid = kid.map_or_else(|| format!("k{now}"), str::to_string);
    if manifest.keys.iter().any(|e| e.kid == kid) || config.public_keys.iter().any(|k| k.kid == kid)
    {
        return Err(KeyringError::KidTaken(kid));
    }
    signing_keys::generate_pair(dir, &kid)?;
    let added = Entry {
        kid,
        created_at: now,
        signs_from: now.saturating_add(config.publish_ahead_secs),
    };
    manifest.keys.push(added.clone());
    let retired: Vec<String> = manifest
        .in_force(now, token_lifetime(config))
        .retired
        .iter()
        .map(|e| e.kid.clone())
        .collect();
    manifest.keys.retain(|e| !retired.contains(&e.kid));
    manifest.write(dir)?;
    for kid in &retired {
        for file in [private_file(kid), public_file(kid)] {
            let _ = fs::remove_file(dir.join(file));
        }
    }
    Ok(Rotation {
        added,
        pruned: retired,
        keys: manifest.keys,
    })
}

/// The longest a token signed now stays valid.
fn token_lifetime(config: &JwtConfig) -> u64 {
    config.ttl_secs.saturating_add(config.leeway_secs)
}

fn private_file(kid: &str) -> String {
    format!("{kid}.private.pem")
}

fn public_file(kid: &str) -> String {
    format!("{kid}.public.pem")
}

fn read(path: &Path) -> Result<Vec<u8>, KeyringError> {
    fs::read(path).map_err(|source| KeyringError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_public(dir: &Path, kid: &str) -> Result<VerifyKey, KeyringError> {
    let path = dir.join(public_file(kid));
    let pem = read(&path)?;
    Ok(VerifyKey::from_pem(kid, &path.display().to_string(), &pem)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kid: &str, signs_from: u64) -> Entry {
        Entry {
            kid: kid.into(),
            created_at: signs_from.saturating_sub(10),
            signs_from,
        }
    }

    fn kids(entries: &[&Entry]) -> Vec<String> {
        entries.iter().map(|e| e.kid.clone()).collect()
    }

    #[test]
    fn a_published_key_verifies_before_it_signs() {
        let m = Manifest {
            keys: vec![entry("a", 100), entry("b", 200)],
        };
        let f = m.in_force(150, 1000);
        assert_eq!(f.signer.map(|e| e.kid.as_str()), Some("a"));
        assert_eq!(kids(&f.verifying), ["a", "b"]);
        let f = m.in_force(200, 1000);
        assert_eq!(f.signer.map(|e| e.kid.as_str()), Some("b"));
        assert_eq!(kids(&f.verifying), ["a", "b"], "a's tokens still live");
    }

    #[test]
    fn a_key_retires_one_token_lifetime_after_its_successor_signs() {
        let m = Manifest {
            keys: vec![entry("a", 100), entry("b", 200), entry("c", 300)],
        };
        let f = m.in_force(1200, 1000);
        assert_eq!(kids(&f.verifying), ["a", "b", "c"]);
        let f = m.in_force(1201, 1000);
        assert_eq!(kids(&f.retired), ["a"]);
        assert_eq!(kids(&f.verifying), ["b", "c"]);
        let f = m.in_force(5000, 1000);
        assert_eq!(kids(&f.verifying), ["c"], "the signer never retires");
        assert_eq!(f.signer.map(|e| e.kid.as_str()), Some("c"));
    }

    #[test]
    fn nothing_signs_before_the_first_start() {
        let m = Manifest {
            keys: vec![entry("a", 100)],
        };
        let f = m.in_force(99, 10);
        assert!(f.signer.is_none());
        assert_eq!(kids(&f.verifying), ["a"]);
        assert!(Manifest::default().in_force(0, 10).signer.is_none());
    }

    fn keyring_config(dir: &Path) -> JwtConfig {
        JwtConfig {
            keyring_dir: Some(dir.to_path_buf()),
            public_keys: vec![],
            private_key_path: dir.join("absent.pem"),
            ttl_secs: 100,
            leeway_secs: 5,
            publish_ahead_secs: 10,
            ..JwtConfig::default()
        }
    }

    #[test]
    fn rotation_publishes_then_signs_then_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let config = keyring_config(dir.path());
        let first = rotate(&config, Some("one"), 1_000).unwrap();
        assert_eq!(first.added.signs_from, 1_010);
        assert!(load(&config, 1_005).unwrap().signer.is_none());
        let loaded = load(&config, 1_010).unwrap();
        assert_eq!(
            loaded.signer.map(|s| s.kid().to_string()),
            Some("one".into())
        );
        assert!(matches!(
            rotate(&config, Some("one"), 1_020),
            Err(KeyringError::KidTaken(_))
        ));

        rotate(&config, Some("two"), 2_000).unwrap();
        let loaded = load(&config, 2_011).unwrap();
        assert_eq!(loaded.signer.unwrap().kid(), "two");
        let kids: Vec<_> = loaded.verifying.iter().map(VerifyKey::kid).collect();
        assert_eq!(kids, ["one", "two"]);

        // "two" signs from 2_010; "one" retires after 2_010 + 105.
        let third = rotate(&config, None, 2_200).unwrap();
        assert_eq!(third.added.kid, "k2200");
        assert_eq!(third.pruned, ["one"]);
        assert!(!dir.path().join("one.private.pem").exists());
        assert!(dir.path().join("two.private.pem").exists());
        let on_disk = Manifest::read(dir.path()).unwrap();
        assert_eq!(on_disk.keys.len(), 2);
    }

    #[test]
    fn a_corrupt_manifest_is_an_error_not_an_empty_keyring() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(MANIFEST), "{\"keys\": [").unwrap();
        assert!(matches!(
            Manifest::read(dir.path()),
            Err(KeyringError::Manifest { .. })
        ));
        assert!(matches!(
            rotate(&keyring_config(dir.path()), None, 1),
            Err(KeyringError::Manifest { .. })
        ));
    }
}
