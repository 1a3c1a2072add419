//! Fleet reports: every gateway, api and worker says once a second what it
//! is and how it is, so the `/ops` dashboard can show each process with its
//! health, its rules version and its counts without knowing the topology.
//!
//! ```text
//!  gateway ─┐  MemberReport (JSON), every REPORT_INTERVAL
//!  api ─────┼──▶ HSET <prefix>:{fleet}:members <role>:<id>
//!  worker ──┘                         │
//!                                     ▼
//!  api: GET /ops/api/sales/{id} ──▶ members(): live = seen within LIVE_WITHIN,
//!                                   entries silent for FORGET_AFTER are removed
//! ```
//!
//! One hash under one hash tag: one slot on Redis Cluster, one HGETALL per
//! dashboard refresh. A report carries cumulative counts (decisions,
//! histograms); readers sum them over live members and take rates as the
//! difference of two reads, so no process keeps per-reader state.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::clock::unix_ms;
use crate::keys::KeySchema;
use crate::redis_client::RedisConn;

/// How often each process writes its report.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// A member whose last report is older than this is shown as down.
pub const LIVE_WITHIN: Duration = Duration::from_secs(3);
/// A member silent this long is removed from the hash (it was stopped or
/// replaced; its id will not come back).
pub const FORGET_AFTER: Duration = Duration::from_secs(600);

/// What kind of process reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Gateway,
    Api,
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Api => "api",
            Role::Worker => "worker",
        }
    }
}

/// The rules a gateway runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RulesReport {
    pub version: u64,
    pub hash: String,
    pub loaded_at: String,
}

/// One process's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberReport {
    pub role: Role,
    /// Unique within the role: `<host>:<port>` of its listener.
    pub id: String,
    pub version: String,
    pub started_at_ms: u64,
    pub seen_at_ms: u64,
    /// Each dependency's state as this process sees it (`redis`, `mysql`,
    /// `broker`, `upstreams`): healthy when all are true.
    pub health: BTreeMap<String, bool>,
    #[serde(default)]
    pub rules: Option<RulesReport>,
    /// Where its admin listener answers (gateways), for actions that must
    /// reach every gateway (a rules reload).
    #[serde(default)]
    pub admin_url: Option<String>,
    /// Cumulative admission decisions by sale and outcome (gateways).
    #[serde(default)]
    pub decisions: BTreeMap<u64, BTreeMap<String, u64>>,
    /// Cumulative latency histograms by name (`publish_confirm`,
    /// `end_to_end`).
    #[serde(default)]
    pub latency: BTreeMap<String, Histogram>,
    /// Cumulative counters by name (`orders_committed`).
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
}

impl MemberReport {
    /// A report of `role`/`id` started at `started_at_ms`, seen now.
    pub fn new(role: Role, id: impl Into<String>, started_at_ms: u64) -> MemberReport {
        MemberReport {
            role,
            id: id.into(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at_ms,
            seen_at_ms: unix_ms(),
            health: BTreeMap::new(),
            rules: None,
            admin_url: None,
            decisions: BTreeMap::new(),
            latency: BTreeMap::new(),
            counters: BTreeMap::new(),
        }
    }

    fn field(&self) -> String {
        format!("{}:{}", self.role.as_str(), self.id)
    }

    pub fn healthy(&self) -> bool {
        self.health.values().all(|ok| *ok)
    }
}

/// A cumulative histogram: `counts[i]` observations `<= bounds[i]` (in
/// seconds), as Prometheus keeps them, plus the total count.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub count: u64,
}

impl Histogram {
    /// The snapshot of a Prometheus histogram.
    pub fn of(h: &prometheus::Histogram) -> Histogram {
        use prometheus::core::Metric;
        let m = h.metric();
        let p = m.get_histogram();
        Histogram {
            bounds: p.get_bucket().iter().map(|b| b.upper_bound()).collect(),
            counts: p
                .get_bucket()
                .iter()
                .map(|b| b.cumulative_count())
                .collect(),
            count: p.get_sample_count(),
        }
    }

    /// Adds `other` (same bounds; a histogram with other bounds is left
    /// out rather than mixed in wrongly).
    pub fn add(&mut self, other: &Histogram) {
        if self.bounds.is_empty() && self.count == 0 {
            *self = other.clone();
            return;
        }
        if self.bounds != other.bounds {
            return;
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
    }

    /// The `q` quantile (0..=1) in seconds, interpolated within its bucket
    /// as Prometheus' `histogram_quantile` does; `None` without
    /// observations. Beyond the last bound it answers the last bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let mut below = 0u64;
        let mut lower = 0.0;
        for (bound, cumulative) in self.bounds.iter().zip(&self.counts) {
            if *cumulative as f64 >= rank {
                let inside = (*cumulative - below) as f64;
                if inside == 0.0 {
                    return Some(*bound);
                }
                return Some(lower + (bound - lower) * (rank - below as f64) / inside);
            }
            below = *cumulative;
            lower = *bound;
        }
        self.bounds.last().copied()
    }
}

/// `<hostname>:<port>`: how a process is named when its config does not
/// name it (unique per host and listener).
pub fn host_id(port: u16) -> String {
    format!("{}:{port}", host_name())
}

/// This host's name (`localhost` when it has none).
pub fn host_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    if host.is_empty() {
        "localhost".into()
    } else {
        host
    }
}

/// A member as read back: its report and whether it is live.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub report: MemberReport,
    pub live: bool,
    pub seen_ms_ago: u64,
}

/// Writes `report` (stamped now).
pub async fn publish(
    conn: &mut RedisConn,
    keys: &KeySchema,
    report: &mut MemberReport,
) -> redis::RedisResult<()> {
    report.seen_at_ms = unix_ms();
    let json = serde_json::to_string(report).map_err(|e| {
        redis::RedisError::from((redis::ErrorKind::Client, "report", e.to_string()))
    })?;
    conn.hset::<_, _, _, ()>(keys.fleet_members(), report.field(), json)
        .await
}

/// Every member, by role then id; removes those silent for
/// [`FORGET_AFTER`] and skips entries that do not parse (written by a
/// newer version, say) rather than failing the whole read.
pub async fn members(conn: &mut RedisConn, keys: &KeySchema) -> redis::RedisResult<Vec<Member>> {
    let key = keys.fleet_members();
    let all: BTreeMap<String, String> = conn.hgetall(&key).await?;
    let now = unix_ms();
    let mut out = Vec::new();
    let mut forgotten = Vec::new();
    for (field, json) in all {
        let Ok(report) = serde_json::from_str::<MemberReport>(&json) else {
            continue;
        };
        let ago = now.saturating_sub(report.seen_at_ms);
        if ago > FORGET_AFTER.as_millis() as u64 {
            forgotten.push(field);
            continue;
        }
        out.push(Member {
            live: ago <= LIVE_WITHIN.as_millis() as u64,
            seen_ms_ago: ago,
            report,
        });
    }
    if !forgotten.is_empty() {
        conn.hdel::<_, _, ()>(&key, forgotten).await?;
    }
    out.sort_by(|a, b| (a.report.role, &a.report.id).cmp(&(b.report.role, &b.report.id)));
    Ok(out)
}

/// Runs `report` every [`REPORT_INTERVAL`] until the task is dropped,
/// publishing what it returns; a failed write is logged and retried on the
/// next tick (the dashboard shows the member as down meanwhile).
pub async fn report_forever<F, Fut>(mut conn: RedisConn, keys: KeySchema, mut report: F)
where
    F: FnMut() -> Fut + Send,
    Fut: std::future::Future<Output = MemberReport> + Send,
{
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let mut r = report().await;
        match publish(&mut conn, &keys, &mut r).await {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "fleet report not written");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(counts: &[u64]) -> Histogram {
        Histogram {
            bounds: vec![0.001, 0.01, 0.1],
            counts: counts.to_vec(),
            count: *counts.last().unwrap(),
        }
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        // 50 at <= 1 ms, 40 more at <= 10 ms, 10 more at <= 100 ms.
        let h = hist(&[50, 90, 100]);
        assert!((h.quantile(0.5).unwrap() - 0.001).abs() < 1e-9);
        // rank 70: 20 of the 40 between 1 and 10 ms → 5.5 ms.
        assert!((h.quantile(0.7).unwrap() - 0.0055).abs() < 1e-9);
        assert!((h.quantile(0.99).unwrap() - 0.091).abs() < 1e-9);
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn adding_sums_same_bounds_and_ignores_others() {
        let mut total = Histogram::default();
        total.add(&hist(&[1, 2, 3]));
        total.add(&hist(&[1, 1, 1]));
        assert_eq!(total.counts, vec![2, 3, 4]);
        assert_eq!(total.count, 4);
        let other = Histogram {
            bounds: vec![1.0],
            counts: vec![5],
            count: 5,
        };
        total.add(&other);
        assert_eq!(total.count, 4);
    }

    #[test]
    fn a_prometheus_histogram_snapshots_cumulatively() {
        let h = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new("t", "t").buckets(vec![0.01, 0.1]),
        )
        .unwrap();
        h.observe(0.005);
        h.observe(0.05);
        h.observe(5.0);
        let s = Histogram::of(&h);
        assert_eq!(s.bounds, vec![0.01, 0.1]);
        assert_eq!(s.counts, vec![1, 2]);
        assert_eq!(s.count, 3);
        assert_eq!(s.quantile(1.0), Some(0.1), "beyond the last bound");
    }

    #[test]
    fn health_is_all_dependencies() {
        let mut r = MemberReport::new(Role::Api, "a:1", 0);
        assert!(r.healthy());
        r.health.insert("mysql".into(), true);
        r.health.insert("redis".into(), false);
        assert!(!r.healthy());
        assert_eq!(r.field(), "api:a:1");
    }
}
