//! The Redis key schema, in one place so the gateway's Lua scripts, the api
//! and the workers can never disagree on a name.
//!
//! Every key of one sale carries the same hash tag, `{sale:ID}`, so on Redis
//! Cluster they all live in one slot and an admission is a single-slot script.
//! Every key starts with the configured prefix so deployments and parallel
//! tests can share one Redis without touching each other's data:
//!
//! ```text
//! <prefix>:{sale:42}:info        hash   sale window, stock_total, prices (admission reads it)
//! <prefix>:{sale:42}:stock       int    remaining stock, only ever moved by scripts
//! <prefix>:{sale:42}:buyers      set    users queued or bought (dedupe)
//! <prefix>:{sale:42}:resv        hash   user -> "request_id:admitted_ms[:c]" (in flight;
//!                                       ":c" once a worker claimed it; see
//!                                       `crate::reservation`)
//! <prefix>:{sale:42}:released    set    request ids rolled back or timed out, so a
//!                                       late message for one is refused
//! <prefix>:{sale:42}:returned    set    order ids whose unit came back after a close
//! <prefix>:{sale:42}:result:<u>  string user's result for polling
//! <prefix>:{sale:42}:path:<u>    string user's hidden path
//! <prefix>:{sale:42}:limit:<u>   zset   sliding-window limiter
//! <prefix>:{sale:42}:captcha:<u> string captcha answer
//! <prefix>:{sale:42}:cache       string cached sale JSON (cache-aside)
//! <prefix>:idem:<u>:<key>        string a pay idempotency key and its first answer
//! <prefix>:lock:<name>           string a named lock's owner token
//! <prefix>:worker:attempts:<id>  int    failed attempts of one order message
//! <prefix>:{rules}:bundle:<v>    string one rules bundle (JSON), by version
//! <prefix>:{rules}:seq           int    last bundle version handed out
//! <prefix>:{rules}:staged        int    the version gateways are asked to prepare
//! <prefix>:{rules}:active        int    the version every gateway runs
//! <prefix>:{rules}:history       list   versions active before, newest first
//! <prefix>:{rules}:gateways      hash   gateway id -> its last report (JSON)
//! ```

use std::fmt;

/// Builds key names for one deployment (one prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySchema {
    prefix: String,
}

/// The keys of the rules bundles (see `rules_bundle`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulesKeys {
    base: String,
}

impl RulesKeys {
    pub fn bundle(&self, version: u64) -> String {
        format!("{}:bundle:{version}", self.base)
    }
    pub fn seq(&self) -> String {
        format!("{}:seq", self.base)
    }
    pub fn staged(&self) -> String {
        format!("{}:staged", self.base)
    }
    pub fn active(&self) -> String {
        format!("{}:active", self.base)
    }
    pub fn history(&self) -> String {
        format!("{}:history", self.base)
    }
    pub fn gateways(&self) -> String {
        format!("{}:gateways", self.base)
    }
}

/// The keys of one sale. All share the sale's hash tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleKeys {
    base: String,
}

impl KeySchema {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The keys of the rules bundles; one hash tag, so a push's writes are
    /// one slot on Redis Cluster too.
    pub fn rules(&self) -> RulesKeys {
        RulesKeys {
            base: format!("{}:{{rules}}", self.prefix),
        }
    }

    /// The fleet's reports (see `fleet`): one hash, one slot.
    pub fn fleet_members(&self) -> String {
        format!("{}:{{fleet}}:members", self.prefix)
    }

    /// The keys of sale `sale_id`.
    pub fn sale(&self, sale_id: u64) -> SaleKeys {
        SaleKeys {
            base: format!("{}:{{sale:{sale_id}}}", self.prefix),
        }
    }

    /// Pub/sub channel announcing sale changes (warm-up, sold out, reopened),
    /// so every gateway refreshes its local copy and sold-out mark.
    pub fn sale_events_channel(&self) -> String {
        format!("{}:events:sales", self.prefix)
    }

    /// A consumable idempotency key for paying, bound to one user.
    pub fn idempotency(&self, user_id: u64, key: &str) -> String {
        format!("{}:idem:{user_id}:{key}", self.prefix)
    }

    /// A named distributed lock (e.g. the timeout sweeper's).
    pub fn lock(&self, name: &str) -> String {
        format!("{}:lock:{name}", self.prefix)
    }

    /// How often the order worker has failed one message on its own
    /// (`INCR`ed per failed attempt; at `amqp.delivery_limit` the message is
    /// dead-lettered). Not a sale key: a message may name an unknown sale.
    pub fn worker_attempts(&self, message_id: &str) -> String {
        format!("{}:worker:attempts:{message_id}", self.prefix)
    }

    /// Pattern matching every key of this prefix, for cleanup.
    pub fn all_keys_pattern(&self) -> String {
        format!("{}:*", self.prefix)
    }
}

impl SaleKeys {
    pub fn info(&self) -> String {
        format!("{}:info", self.base)
    }
    pub fn stock(&self) -> String {
        format!("{}:stock", self.base)
    }
    pub fn buyers(&self) -> String {
        format!("{}:buyers", self.base)
    }
    pub fn reservations(&self) -> String {
        format!("{}:resv", self.base)
    }
    /// Request ids whose reservation was released without an order.
    pub fn released(&self) -> String {
        format!("{}:released", self.base)
    }
    /// Order ids whose unit went back to the stock counter after the order
    /// closed, so a retried return never adds a unit twice.
    pub fn returned(&self) -> String {
        format!("{}:returned", self.base)
    }
    pub fn cache(&self) -> String {
        format!("{}:cache", self.base)
    }
    pub fn result(&self, user_id: u64) -> String {
        format!("{}:result:{user_id}", self.base)
    }
    pub fn path(&self, user_id: u64) -> String {
        format!("{}:path:{user_id}", self.base)
    }
    pub fn limit(&self, user_id: u64) -> String {
        format!("{}:limit:{user_id}", self.base)
    }
    pub fn captcha(&self, user_id: u64) -> String {
        format!("{}:captcha:{user_id}", self.base)
    }
    /// The common start of every key of this sale, `<prefix>:{sale:ID}`;
    /// Lua scripts derive per-user keys from it.
    pub fn base(&self) -> &str {
        &self.base
    }
}

impl fmt::Display for SaleKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

/// The hash tag of a key: the part between the first `{` and the next `}`,
/// which is what Redis Cluster hashes.
pub fn hash_tag(key: &str) -> Option<&str> {
    let start = key.find('{')? + 1;
    let len = key[start..].find('}')?;
    (len > 0).then(|| &key[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rules_key_shares_one_hash_tag() {
        let r = KeySchema::new("seckill").rules();
        for key in [
            r.bundle(3),
            r.seq(),
            r.staged(),
            r.active(),
            r.history(),
            r.gateways(),
        ] {
            assert!(key.starts_with("seckill:"), "{key}");
            assert_eq!(hash_tag(&key), Some("rules"), "{key}");
        }
    }

    #[test]
    fn every_key_of_a_sale_shares_one_hash_tag() {
        let s = KeySchema::new("seckill").sale(42);
        let keys = [
            s.info(),
            s.stock(),
            s.buyers(),
            s.reservations(),
            s.released(),
            s.returned(),
            s.cache(),
            s.result(7),
            s.path(7),
            s.limit(7),
            s.captcha(7),
        ];
        for k in &keys {
            assert_eq!(hash_tag(k), Some("sale:42"), "{k}");
            assert!(k.starts_with("seckill:{sale:42}:"), "{k}");
        }
        let unique: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(unique.len(), keys.len());
    }

    #[test]
    fn worker_attempts_live_under_the_prefix() {
        let keys = KeySchema::new("seckill");
        let k = keys.worker_attempts("0192-ab");
        assert_eq!(k, "seckill:worker:attempts:0192-ab");
        assert!(k.starts_with(keys.all_keys_pattern().trim_end_matches('*')));
        assert_eq!(hash_tag(&k), None, "not a key of one sale");
    }

    #[test]
    fn prefixes_isolate_deployments() {
        let a = KeySchema::new("a").sale(1).stock();
        let b = KeySchema::new("b").sale(1).stock();
        assert_ne!(a, b);
        assert_eq!(hash_tag(&a), hash_tag(&b));
    }

    #[test]
    fn hash_tag_edge_cases() {
        assert_eq!(hash_tag("no-tag"), None);
        assert_eq!(hash_tag("a{}b"), None);
        assert_eq!(hash_tag("a{x}{y}"), Some("x"));
    }
}
