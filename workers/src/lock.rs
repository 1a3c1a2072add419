//! A named lock in Redis, so periodic work (the timeout sweeper) runs in one
//! worker at a time instead of in every one.
//!
//! ```text
//! try_acquire   SET <prefix>:lock:<name> <owner> NX PX ttl   → guard, or None
//! watchdog      every ttl/3: lock_renew.lua   (PEXPIRE only if still <owner>)
//! release       lock_release.lua              (DEL only if still <owner>)
//! holder dies   nothing renews; the key expires after ttl; another takes it
//! ```
//!
//! * **Owner value**: 128 random bits per acquisition, so a holder can prove
//!   the lock is still *its* lock.
//! * **Compare-and-delete**: a holder that stalled past its ttl (GC-free, but
//!   a stopped VM or a long MySQL wait does it) must not delete the lock a
//!   second worker took meanwhile; `GET` + `DEL` as two commands would race,
//!   so both run in one script.
//! * **Watchdog**: the ttl stays short (a dead holder frees the lock fast)
//!   while a long sweep keeps it, by renewing at a third of the ttl. If a
//!   renewal finds the lock gone or someone else's, the guard reports it
//!   lost ([`LockGuard::is_held`]).
//!
//! Known limit, accepted: a holder paused longer than the ttl can still be
//! working when a second worker takes over. Correctness never depends on
//! this lock: every sweep step is guarded and idempotent on its own; the
//! lock only keeps N workers from doing the same work N times.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use rand::RngCore;
use seckill_contracts::keys::KeySchema;
use seckill_contracts::redis_client::RedisConn;
use tokio::sync::watch;

/// Deletes the key only when it holds the caller's owner value.
pub const RELEASE_SCRIPT: &str = include_str!("../../lua/workers/lock_release.lua");
/// Extends the key's expiry only when it holds the caller's owner value.
pub const RENEW_SCRIPT: &str = include_str!("../../lua/workers/lock_renew.lua");

static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RELEASE_SCRIPT));
static RENEW: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RENEW_SCRIPT));

/// A lock operation could not reach Redis. Not getting the lock is not an
/// error ([`RedisLock::try_acquire`] returns `None`).
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// One named lock of one deployment (key `KeySchema::lock(name)`).
#[derive(Clone)]
pub struct RedisLock {
    redis: RedisConn,
    key: String,
    ttl: Duration,
}

impl RedisLock {
    /// A handle; nothing is sent to Redis until [`RedisLock::try_acquire`].
    /// `ttl` is how long a holder that stops renewing keeps others out.
    pub fn new(redis: RedisConn, keys: &KeySchema, name: &str, ttl: Duration) -> RedisLock {
        RedisLock {
            redis,
            key: keys.lock(name),
            ttl: ttl.max(Duration::from_millis(30)),
        }
    }

    /// The Redis key of this lock.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Takes the lock if free and starts its watchdog; `None` while another
    /// owner holds it.
    pub async fn try_acquire(&self) -> Result<Option<LockGuard>, LockError> {
        let owner = new_owner();
        let mut redis = self.redis.clone();
        if !acquire_raw(&mut redis, &self.key, &owner, self.ttl).await? {
            return Ok(None);
        }
        let held = Arc::new(AtomicBool::new(true));
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(watchdog(
            redis,
            self.key.clone(),
            owner.clone(),
            self.ttl,
            held.clone(),
            stopped,
        ));
        Ok(Some(LockGuard {
            redis: self.redis.clone(),
            key: self.key.clone(),
            owner,
            held,
            stop,
        }))
    }
}

/// Proof of holding a [`RedisLock`]. Dropping it stops the watchdog, so the
/// lock then expires by itself; [`LockGuard::release`] frees it at once.
pub struct LockGuard {
    redis: RedisConn,
    key: String,
    owner: String,
    held: Arc<AtomicBool>,
    stop: watch::Sender<bool>,
}

impl LockGuard {
    /// This acquisition's owner value.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// False once the watchdog found the lock expired or taken over: the
    /// holder should stop work it only wanted to do alone.
    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::SeqCst)
    }

    /// Stops the watchdog and deletes the lock if it is still ours. Returns
    /// whether it was.
    pub async fn release(self) -> Result<bool, LockError> {
        let _ = self.stop.send(true);
        let mut redis = self.redis.clone();
        let released = release_raw(&mut redis, &self.key, &self.owner).await?;
        self.held.store(false, Ordering::SeqCst);
        Ok(released)
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn watchdog(
    mut redis: RedisConn,
    key: String,
    owner: String,
    ttl: Duration,
    held: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    let every = ttl / 3;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(every) => {}
        }
        match renew_raw(&mut redis, &key, &owner, ttl).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(key, "lock lost: it expired or another owner took it");
                held.store(false, Ordering::SeqCst);
                return;
            }
            // Transient: the next tick tries again while the ttl lasts.
            Err(e) => tracing::warn!(key, error = %e, "renewing the lock failed"),
        }
    }
}

/// A fresh owner value: 128 random bits, hex.
pub fn new_owner() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// `SET key owner NX PX ttl`: true when the lock was free and is now `owner`'s.
pub async fn acquire_raw(
    redis: &mut RedisConn,
    key: &str,
    owner: &str,
    ttl: Duration,
) -> Result<bool, LockError> {
    let set: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg(owner)
        .arg("NX")
        .arg("PX")
        .arg(millis(ttl))
        .query_async(redis)
        .await?;
    Ok(set.is_some())
}

/// Deletes the lock if it holds `owner`; true when it did.
pub async fn release_raw(redis: &mut RedisConn, key: &str, owner: &str) -> Result<bool, LockError> {
    let n: i64 = RELEASE.key(key).arg(owner).invoke_async(redis).await?;
    Ok(n == 1)
}

/// Resets the lock's expiry to `ttl` if it holds `owner`; true when it did.
pub async fn renew_raw(
    redis: &mut RedisConn,
    key: &str,
    owner: &str,
    ttl: Duration,
) -> Result<bool, LockError> {
    let n: i64 = RENEW
        .key(key)
        .arg(owner)
        .arg(millis(ttl))
        .invoke_async(redis)
        .await?;
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_unique_128_bit_hex() {
        let a = new_owner();
        let b = new_owner();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn ttl_millis_never_zero() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
    }
}
