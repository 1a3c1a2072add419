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
//! A lookup is a read lock and three string-keyed maps probed with the
//! request's own route and parameters: no allocation on a replay.
//! No phase runs for a short-circuited request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::decisions::Resolved;
use crate::problem::LocalResponse;

/// Longest a rule may pin an answer: the worst case of a stale refusal.
pub const MAX_TTL: Duration = Duration::from_secs(60);
/// Answers one rule version may hold; past it (after dropping expired
/// ones) a new answer is not stored and the rules simply run.
const CAPACITY: usize = 100_000;

/// A stored answer, with the admission decision it stands for: each
/// replay counts it (see [`crate::decisions`]), so the crowd a shortcut
/// answers is not missing from the dashboard.
#[derive(Debug, Clone)]
pub struct Stored {
    pub response: Arc<LocalResponse>,
    pub counted: Option<Resolved>,
}

struct Entry {
    stored: Stored,
    expires_at: Instant,
}

/// value → entry, for one (route, path parameter).
type ByValue = HashMap<Box<str>, Entry>;

#[derive(Default)]
struct Table {
    /// route → parameter name → value: looked up with the request's own
    /// strings, so a replay allocates nothing.
    by_route: HashMap<Box<str>, HashMap<Box<str>, ByValue>>,
    len: usize,
}

impl Table {
    fn drop_expired(&mut self, now: Instant) {
        let mut len = 0;
        for params in self.by_route.values_mut() {
            for values in params.values_mut() {
                values.retain(|_, e| e.expires_at > now);
                len += values.len();
            }
        }
        self.len = len;
    }
}

/// The shortcuts of one rule version.
pub struct Shortcuts {
    table: RwLock<Table>,
    /// Set by the first `set`: routes of a rule set that never uses
    /// shortcuts pay one atomic load, not a lock and a lookup.
    used: AtomicBool,
    capacity: usize,
}

impl Default for Shortcuts {
    fn default() -> Self {
        Shortcuts::with_capacity(CAPACITY)
    }
}

impl Shortcuts {
    fn with_capacity(capacity: usize) -> Shortcuts {
        Shortcuts {
            table: RwLock::default(),
            used: AtomicBool::new(false),
            capacity,
        }
    }

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
        counted: Option<Resolved>,
    ) {
        self.used.store(true, Ordering::Relaxed);
        let now = Instant::now();
        let entry = Entry {
            stored: Stored {
                response: Arc::new(response),
                counted,
            },
            expires_at: now + ttl.min(MAX_TTL),
        };
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        if table.len >= self.capacity {
            table.drop_expired(now);
            if table.len >= self.capacity {
                return;
            }
        }
        let values = table
            .by_route
            .entry(route.into())
            .or_default()
            .entry(param.into())
            .or_default();
        if values.insert(value.into(), entry).is_none() {
            table.len += 1;
        }
    }

    /// Forgets the shortcut, e.g. when stock came back.
    pub fn clear(&self, route: &str, param: &str, value: &str) {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        let removed = table
            .by_route
            .get_mut(route)
            .and_then(|params| params.get_mut(param))
            .and_then(|values| values.remove(value));
        if removed.is_some() {
            table.len -= 1;
        }
    }

    /// The stored answer for this request, if any and not expired.
    pub fn find(&self, route: &str, params: &[(String, String)]) -> Option<Stored> {
        if !self.used.load(Ordering::Relaxed) {
            return None;
        }
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        let by_param = table.by_route.get(route)?;
        let now = Instant::now();
        params.iter().find_map(|(name, value)| {
            by_param
                .get(name.as_str())?
                .get(value.as_str())
                .filter(|e| e.expires_at > now)
                .map(|e| e.stored.clone())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decisions::Decisions;

    fn params(v: &str) -> Vec<(String, String)> {
        vec![("path".into(), "abc".into()), ("sale_id".into(), v.into())]
    }

    #[test]
    fn matches_route_param_and_value_then_expires() {
        let s = Shortcuts::default();
        let decisions = Decisions::default();
        s.set(
            "seckill",
            "sale_id",
            "42",
            LocalResponse::problem(410, "sold out"),
            Duration::from_millis(80),
            Some(decisions.resolve("sold_out", Some(42))),
        );
        let found = s.find("seckill", &params("42")).unwrap();
        assert_eq!(found.response.status, 410);
        found.counted.unwrap().record();
        assert_eq!(decisions.by_sale()[&42]["sold_out"], 1);
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
        {
            let table = s.table.read().unwrap();
            let entry = &table.by_route["r"]["p"]["1"];
            assert!(entry.expires_at <= Instant::now() + MAX_TTL);
        }
        s.clear("r", "p", "1");
        assert!(s.find("r", &[("p".into(), "1".into())]).is_none());
        assert_eq!(s.table.read().unwrap().len, 0);
    }

    #[test]
    fn the_table_is_bounded_and_expired_answers_make_room() {
        let s = Shortcuts::with_capacity(3);
        let answer = || LocalResponse::problem(410, "x");
        for i in 0..3 {
            s.set(
                "r",
                "p",
                &i.to_string(),
                answer(),
                Duration::from_millis(50),
                None,
            );
        }
        s.set("r", "p", "new", answer(), Duration::from_secs(5), None);
        assert!(s.find("r", &[("p".into(), "new".into())]).is_none(), "full");
        std::thread::sleep(Duration::from_millis(80));
        s.set("r", "p", "new", answer(), Duration::from_secs(5), None);
        assert!(s.find("r", &[("p".into(), "new".into())]).is_some());
        assert_eq!(s.table.read().unwrap().len, 1);
    }
}
