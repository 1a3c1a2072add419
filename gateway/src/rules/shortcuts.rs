//! Answers a rule decided once and the gateway replays without running Lua:
//! "every request for sale 42 is 410 for the next 500 ms".
//!
//! A flash sale sells out in seconds and is then hit for minutes; running the
//! rules for each of those requests only to reach the same refusal costs
//! more than the rest of the request. So a rule may register its answer for
//! `(route, path parameter = value)` with a short TTL
//! (`seckill.shortcut(...)`); the proxy checks the table after the JWT check
//! (a shortcut never skips authentication) and writes the stored answer.
//! The rule stays in charge: it decides what is stored and for how long,
//! the table belongs to one rule version (a reload starts empty), and when
//! an entry expires the next request runs the rules again and may renew it.
//! No phase runs for a short-circuited request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::problem::LocalResponse;

/// Longest a rule may pin an answer: the worst case of a stale refusal.
pub const MAX_TTL: Duration = Duration::from_secs(60);
const CAPACITY: u64 = 100_000;

/// The admission decision a stored answer stands for: each replay counts
/// it (see [`crate::decisions`]), so the crowd a shortcut answers is not
/// missing from the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    pub outcome: String,
    pub sale_id: Option<u64>,
}

/// A stored answer.
#[derive(Debug, Clone)]
pub struct Stored {
    pub response: Arc<LocalResponse>,
    pub counted: Option<Arc<Counted>>,
}

#[derive(Clone)]
struct Entry {
    stored: Stored,
    ttl: Duration,
}

struct PerEntryTtl;

impl moka::Expiry<(String, String, String), Entry> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _: &(String, String, String),
        v: &Entry,
        _: Instant,
    ) -> Option<Duration> {
        Some(v.ttl)
    }
    fn expire_after_update(
        &self,
        _: &(String, String, String),
        v: &Entry,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.ttl)
    }
}

/// The shortcuts of one rule version.
pub struct Shortcuts {
    entries: moka::sync::Cache<(String, String, String), Entry>,
    /// Set by the first `set`: routes of a rule set that never uses
    /// shortcuts pay one atomic load, not a key allocation and a lookup.
    used: AtomicBool,
}

impl Default for Shortcuts {
    fn default() -> Self {
        Shortcuts {
            entries: moka::sync::Cache::builder()
                .max_capacity(CAPACITY)
                .expire_after(PerEntryTtl)
                .build(),
            used: AtomicBool::new(false),
        }
    }
}

impl Shortcuts {
    /// Stores `response` for requests of `route` whose path parameter
    /// `param` is `value`, for `ttl` (at most [`MAX_TTL`]); each replay
    /// counts `counted` when given.
    pub fn set(
        &self,
        route: &str,
        param: &str,
        value: &str,
        response: LocalResponse,
        ttl: Duration,
        counted: Option<Counted>,
    ) {
        self.used.store(true, Ordering::Relaxed);
        self.entries.insert(
            (route.to_string(), param.to_string(), value.to_string()),
            Entry {
                stored: Stored {
                    response: Arc::new(response),
                    counted: counted.map(Arc::new),
                },
                ttl: ttl.min(MAX_TTL),
            },
        );
    }

    /// Forgets the shortcut, e.g. when stock came back.
    pub fn clear(&self, route: &str, param: &str, value: &str) {
        self.entries
            .invalidate(&(route.to_string(), param.to_string(), value.to_string()));
    }

    /// The stored answer for this request, if any.
    pub fn find(&self, route: &str, params: &[(String, String)]) -> Option<Stored> {
        if !self.used.load(Ordering::Relaxed) {
            return None;
        }
        params.iter().find_map(|(name, value)| {
            self.entries
                .get(&(route.to_string(), name.clone(), value.clone()))
                .map(|e| e.stored)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: &str) -> Vec<(String, String)> {
        vec![("path".into(), "abc".into()), ("sale_id".into(), v.into())]
    }

    #[test]
    fn matches_route_param_and_value_then_expires() {
        let s = Shortcuts::default();
        s.set(
            "seckill",
            "sale_id",
            "42",
            LocalResponse::problem(410, "sold out"),
            Duration::from_millis(80),
            Some(Counted {
                outcome: "sold_out".into(),
                sale_id: Some(42),
            }),
        );
        let found = s.find("seckill", &params("42")).unwrap();
        assert_eq!(found.response.status, 410);
        assert_eq!(found.counted.unwrap().sale_id, Some(42));
        assert!(s.find("seckill", &params("43")).is_none());
        assert!(s.find("other", &params("42")).is_none());
        std::thread::sleep(Duration::from_millis(150));
        assert!(s.find("seckill", &params("42")).is_none());
    }

    #[test]
    fn clear_forgets_and_ttl_is_capped() {
        let s = Shortcuts::default();
        s.set(
            "r",
            "p",
            "1",
            LocalResponse::problem(410, "x"),
            Duration::from_secs(3600),
            None,
        );
        assert!(s.find("r", &[("p".into(), "1".into())]).is_some());
        s.clear("r", "p", "1");
        assert!(s.find("r", &[("p".into(), "1".into())]).is_none());
    }
}
