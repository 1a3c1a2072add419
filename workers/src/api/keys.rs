//! The keys this api instance signs and verifies with, kept current.
//!
//! At start they come from the config file plus the keyring
//! ([`crate::keyring::load`]); then a background task rereads the keyring
//! every `jwt.keyring_reload_secs` and swaps in what is in force: a rotated
//! key appears in the JWKS first and starts signing at its `signs_from`,
//! on every instance that reads the same folder, with no restart. A keyring
//! that cannot be read leaves the current keys in place (and says so in
//! the log), so a bad edit never turns logins or verification off.

use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use seckill_contracts::clock::unix_secs;
use seckill_contracts::config::{Config, JwtConfig};
use seckill_contracts::jwt::JwtVerifier;

use crate::keyring::{self, KeyringError, Loaded};
use crate::tokens::TokenSigner;

/// The signer (swappable) and the verifier (whose key set is swappable).
pub struct ApiKeys {
    signer: ArcSwapOption<TokenSigner>,
    verifier: Option<JwtVerifier>,
}

impl ApiKeys {
    /// Loads what is in force now. Key trouble degrades instead of failing:
    /// no signer means login answers 503, no verifier means authenticated
    /// routes answer 503 (never accept).
    pub fn load(config: &Config) -> ApiKeys {
        let loaded = keyring::load(&config.jwt, unix_secs())
            .inspect_err(|e| tracing::error!(error = %e, "cannot load the keyring"))
            .ok();
        let (signer, verifying) = match loaded {
            Some(Loaded { signer, verifying }) => (signer, verifying),
            None => (None, Vec::new()),
        };
        if signer.is_none() {
            tracing::error!("login disabled: no signing key");
        }
        let verifier = JwtVerifier::with_keys(
            verifying,
            &config.jwt.issuer,
            &config.jwt.audience,
            config.jwt.leeway_secs,
            config.api.jwt_cache_entries,
        )
        .inspect_err(|e| {
            tracing::error!(error = %e, "authenticated routes disabled: cannot load public keys")
        })
        .ok();
        ApiKeys {
            signer: ArcSwapOption::new(signer.map(Arc::new)),
            verifier,
        }
    }

    /// The current signer, if any key can sign.
    pub fn signer(&self) -> Option<Arc<TokenSigner>> {
        self.signer.load_full()
    }

    /// The verifier, if its keys loaded at start.
    pub fn verifier(&self) -> Option<&JwtVerifier> {
        self.verifier.as_ref()
    }

    /// Rereads the keyring and swaps in what is in force at `now`.
    pub fn reload(&self, config: &JwtConfig, now: u64) -> Result<(), KeyringError> {
        let Loaded { signer, verifying } = keyring::load(config, now)?;
        if let Some(verifier) = &self.verifier {
            let change = verifier.replace_keys(verifying)?;
            if !change.is_empty() {
                tracing::info!(added = ?change.added, removed = ?change.removed, "verification keys changed");
            }
        }
        let before = self.signer().map(|s| s.kid().to_string());
        let after = signer.as_ref().map(|s| s.kid().to_string());
        if before != after {
            tracing::info!(from = ?before, to = ?after, "signing key changed");
        }
        // Keep signing with the old key rather than none.
        if let Some(signer) = signer {
            self.signer.store(Some(Arc::new(signer)));
        }
        Ok(())
    }
}

/// Rereads the keyring every `jwt.keyring_reload_secs` for as long as the
/// keys are in use (the task ends when the last handle is dropped).
pub fn spawn_reload(keys: Weak<ApiKeys>, config: JwtConfig) {
    if config.keyring_dir.is_none() {
        return;
    }
    let period = Duration::from_secs(config.keyring_reload_secs.max(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(holder) = keys.upgrade() else { return };
            if let Err(e) = holder.reload(&config, unix_secs()) {
                tracing::warn!(error = %e, "keyring reload failed; the current keys stay");
            }
        }
    });
}
