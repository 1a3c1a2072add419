//! A dictionary shared by every proxy thread (and so every Lua VM) of one
//! gateway process, with a TTL per entry: what rules use for local marks
//! such as "sale 42 is sold out", which must be visible to all threads at
//! once and must age out by themselves.

use std::time::{Duration, Instant};

/// What a rule may store: Lua's scalar types.
#[derive(Debug, Clone, PartialEq)]
pub enum DictValue {
    Bool(bool),
    Int(i64),
    Num(f64),
    Str(String),
}

#[derive(Clone)]
struct Entry {
    value: DictValue,
    ttl: Option<Duration>,
}

struct PerEntryTtl;

impl moka::Expiry<String, Entry> for PerEntryTtl {
    fn expire_after_create(&self, _: &String, v: &Entry, _: Instant) -> Option<Duration> {
        v.ttl
    }
    fn expire_after_update(
        &self,
        _: &String,
        v: &Entry,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        v.ttl
    }
}

/// The process-wide dictionary.
pub struct SharedDict {
    entries: moka::sync::Cache<String, Entry>,
}

impl SharedDict {
    pub fn new(capacity: u64) -> SharedDict {
        SharedDict {
            entries: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .expire_after(PerEntryTtl)
                .build(),
        }
    }

    pub fn get(&self, key: &str) -> Option<DictValue> {
        self.entries.get(key).map(|e| e.value)
    }

    /// Sets `key`; `ttl` of `None` keeps it until evicted or deleted.
    pub fn set(&self, key: &str, value: DictValue, ttl: Option<Duration>) {
        self.entries.insert(key.to_string(), Entry { value, ttl });
    }

    pub fn delete(&self, key: &str) {
        self.entries.invalidate(key);
    }

    /// Atomically adds `delta` to an integer entry (missing counts as 0) and
    /// returns the new value; a non-integer entry is replaced.
    pub fn incr(&self, key: &str, delta: i64, ttl: Option<Duration>) -> i64 {
        let entry = self
            .entries
            .entry(key.to_string())
            .and_compute_with(|existing| {
                let current = match existing.map(|e| e.into_value().value) {
                    Some(DictValue::Int(i)) => i,
                    _ => 0,
                };
                moka::ops::compute::Op::Put(Entry {
                    value: DictValue::Int(current.saturating_add(delta)),
                    ttl,
                })
            });
        match entry {
            moka::ops::compute::CompResult::Inserted(e)
            | moka::ops::compute::CompResult::ReplacedWith(e) => match e.into_value().value {
                DictValue::Int(i) => i,
                _ => 0,
            },
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_delete_and_ttl() {
        let d = SharedDict::new(100);
        d.set("a", DictValue::Str("x".into()), None);
        d.set("b", DictValue::Bool(true), Some(Duration::from_millis(50)));
        assert_eq!(d.get("a"), Some(DictValue::Str("x".into())));
        assert_eq!(d.get("b"), Some(DictValue::Bool(true)));
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(d.get("b"), None, "expired");
        d.delete("a");
        assert_eq!(d.get("a"), None);
    }

    #[test]
    fn incr_is_atomic_across_threads() {
        let d = std::sync::Arc::new(SharedDict::new(100));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        d.incr("n", 1, None);
                    }
                })
            })
            .collect();
        hs.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(d.get("n"), Some(DictValue::Int(2000)));
    }
}
