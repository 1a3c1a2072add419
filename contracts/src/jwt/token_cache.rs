//! The verified-token cache of [`super::JwtVerifier`]: claims of tokens
//! that already passed, by the SHA-256 of the token.
//!
//! Every authenticated request looks here first, so a hit must cost next
//! to nothing: the table is a fixed array of small sets (four entries
//! each), the set chosen by the hash's first bytes (uniform: a digest),
//! each behind its own mutex, so a lookup is one uncontended lock and four
//! 32-byte compares, with no allocation and no background bookkeeping. A
//! general cache (moka) spent more on its frequency sketch and read
//! buffers than the SHA-256 itself in the gateway's profile.
//!
//! Eviction is by expiry: a full set gives up the entry whose token
//! expires first. Only verified tokens are inserted, so whoever fills a
//! set does so with tokens of their own, and a token that loses its place
//! costs one more RSA verification. Entries past `exp` are refused by the
//! verifier on lookup (it re-checks the clock on every hit) and replaced.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::claims::AccessClaims;

/// Cache key: SHA-256 of the token, so the cache never holds bearer
/// credentials that a heap dump could replay.
pub type TokenHash = [u8; 32];

/// Entries per set.
const WAYS: usize = 4;

struct Entry {
    hash: TokenHash,
    claims: Arc<AccessClaims>,
}

#[derive(Default)]
struct Set {
    entries: [Option<Entry>; WAYS],
}

/// A bounded map of token hash → verified claims.
pub struct TokenCache {
    sets: Box<[Mutex<Set>]>,
    mask: usize,
}

impl TokenCache {
    /// Room for at least `entries` tokens (rounded up to a power of two of
    /// sets).
    pub fn new(entries: u64) -> TokenCache {
        let wanted = usize::try_from(entries).unwrap_or(usize::MAX / WAYS);
        let sets = wanted.div_ceil(WAYS).max(1).next_power_of_two();
        TokenCache {
            sets: (0..sets).map(|_| Mutex::default()).collect(),
            mask: sets - 1,
        }
    }

    fn set(&self, hash: &TokenHash) -> MutexGuard<'_, Set> {
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash[..8]);
        let i = u64::from_le_bytes(first) as usize & self.mask;
        self.sets[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached claims of the token with this hash.
    pub fn get(&self, hash: &TokenHash) -> Option<Arc<AccessClaims>> {
        let set = self.set(hash);
        set.entries
            .iter()
            .flatten()
            .find(|e| e.hash == *hash)
            .map(|e| e.claims.clone())
    }

    /// Caches `claims` for `hash`: in its own place if already there, else
    /// a free one, else in place of the entry that expires first.
    pub fn insert(&self, hash: TokenHash, claims: Arc<AccessClaims>) {
        let mut set = self.set(&hash);
        let place = match set
            .entries
            .iter()
            .position(|e| e.as_ref().is_some_and(|e| e.hash == hash))
        {
            Some(i) => i,
            None => set
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.as_ref().map_or(0, |e| e.claims.exp.saturating_add(1)))
                .map_or(0, |(i, _)| i),
        };
        set.entries[place] = Some(Entry { hash, claims });
    }

    /// Forgets one token.
    pub fn remove(&self, hash: &TokenHash) {
        let mut set = self.set(hash);
        for e in &mut set.entries {
            if e.as_ref().is_some_and(|e| e.hash == *hash) {
                *e = None;
            }
        }
    }

    /// Forgets every token (a verification key was withdrawn).
    pub fn clear(&self) {
        for set in self.sets.iter() {
            let mut set = set.lock().unwrap_or_else(|e| e.into_inner());
            set.entries = Default::default();
        }
    }

    /// Tokens held, expired ones included until they are replaced.
    pub fn len(&self) -> u64 {
        self.sets
            .iter()
            .map(|s| {
                let set = s.lock().unwrap_or_else(|e| e.into_inner());
                set.entries.iter().flatten().count() as u64
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Arc<AccessClaims> {
        Arc::new(AccessClaims {
            sub: "7".into(),
            iss: "i".into(),
            aud: "a".into(),
            exp,
            nbf: 0,
            iat: 0,
            username: "u".into(),
        })
    }

    /// Hashes that all land in set 0 of a small cache.
    fn same_set(n: u8) -> TokenHash {
        let mut h = [0u8; 32];
        h[31] = n;
        h
    }

    #[test]
    fn hits_misses_and_removal() {
        let c = TokenCache::new(100);
        assert!(c.get(&same_set(1)).is_none());
        c.insert(same_set(1), claims(10));
        assert_eq!(c.get(&same_set(1)).unwrap().exp, 10);
        assert!(c.get(&same_set(2)).is_none());
        c.insert(same_set(1), claims(20));
        assert_eq!(c.get(&same_set(1)).unwrap().exp, 20, "replaced in place");
        assert_eq!(c.len(), 1);
        c.remove(&same_set(1));
        assert!(c.get(&same_set(1)).is_none());
    }

    #[test]
    fn a_full_set_gives_up_the_token_that_expires_first() {
        let c = TokenCache::new(4);
        for (n, exp) in [(1, 50), (2, 10), (3, 40), (4, 30)] {
            c.insert(same_set(n), claims(exp));
        }
        c.insert(same_set(5), claims(60));
        assert!(c.get(&same_set(2)).is_none(), "exp 10 went first");
        for n in [1, 3, 4, 5] {
            assert!(c.get(&same_set(n)).is_some(), "{n} kept");
        }
        assert_eq!(c.len(), 4, "bounded");
        c.clear();
        assert!(c.is_empty());
    }

    #[test]
    fn capacity_rounds_up_to_whole_sets() {
        assert_eq!(TokenCache::new(0).sets.len(), 1);
        assert_eq!(TokenCache::new(5).sets.len(), 2);
        assert_eq!(TokenCache::new(100_000).sets.len(), 32_768);
    }
}
