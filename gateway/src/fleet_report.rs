//! This gateway's fleet report (see [`seckill_contracts::fleet`]): once a
//! second, its rules version, the health of what it depends on, its
//! admission decisions by sale and its publish-confirm latency, for the
//! `/ops` dashboard. Ids are the bundles' (`gateway.bundles.id` or
//! `<hostname>:<listen port>`), so `rules status` and `/ops` name a
//! gateway the same way.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use seckill_contracts::clock::unix_ms;
use seckill_contracts::config::Config;
use seckill_contracts::fleet::{self, Histogram, MemberReport, Role, RulesReport};

use crate::metrics;
use crate::pools::Pool;
use crate::rules::bundles::gateway_id;
use crate::rules::RuleEngine;

/// The background service that writes the report.
pub struct FleetReporter {
    id: String,
    admin_url: String,
    started_at_ms: u64,
    rules: Arc<RuleEngine>,
    pools: BTreeMap<String, Arc<Pool>>,
}

impl FleetReporter {
    pub fn new(
        config: &Config,
        rules: Arc<RuleEngine>,
        pools: BTreeMap<String, Arc<Pool>>,
    ) -> FleetReporter {
        let g = &config.gateway;
        FleetReporter {
            id: gateway_id(&g.bundles, g.listen.port()),
            admin_url: if g.admin_url.is_empty() {
                admin_url(g.admin_listen, &fleet::host_name())
            } else {
                g.admin_url.trim_end_matches('/').to_string()
            },
            started_at_ms: unix_ms(),
            rules,
            pools,
        }
    }

    /// What this gateway says of itself now.
    pub fn report(&self) -> MemberReport {
        let mut r = MemberReport::new(Role::Gateway, &self.id, self.started_at_ms);
        let services = self.rules.services();
        // Connected on first use: "not yet needed" is not a fault.
        let broker = services.broker_state() != "reconnecting";
        r.health.insert("broker".into(), broker);
        let upstreams = self
            .pools
            .values()
            .all(|p| p.health().iter().any(|b| b.healthy));
        r.health.insert("upstreams".into(), upstreams);
        let status = self.rules.status();
        r.rules = Some(RulesReport {
            version: status.version,
            hash: status.hash,
            loaded_at: status.loaded_at.to_rfc3339(),
        });
        r.admin_url = Some(self.admin_url.clone());
        r.decisions = services.decisions.by_sale();
        let confirmed = metrics::PUBLISH_CONFIRM.with_label_values(&["confirmed"]);
        r.latency
            .insert("publish_confirm".into(), Histogram::of(&confirmed));
        r
    }
}

/// The admin listener as another process reaches it when
/// `gateway.admin_url` does not say: a wildcard bind under `host`.
fn admin_url(addr: std::net::SocketAddr, host: &str) -> String {
    let host = match addr.ip() {
        ip if ip.is_unspecified() => host.to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    format!("http://{host}:{}", addr.port())
}

#[async_trait]
impl BackgroundService for FleetReporter {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let services = self.rules.services().clone();
        let conn = loop {
            match services.redis().await {
                Ok(conn) => break conn,
                Err(e) => tracing::debug!(error = %e, "fleet report waits for Redis"),
            }
            tokio::select! {
                _ = tokio::time::sleep(fleet::REPORT_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
        };
        let keys = services.keys.clone();
        tokio::select! {
            _ = fleet::report_forever(conn, keys, || async { self.report() }) => {}
            _ = shutdown.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::admin_url;

    #[test]
    fn wildcard_binds_are_advertised_under_the_host_name() {
        let url = |a: &str| admin_url(a.parse().unwrap(), "edge-1");
        assert_eq!(url("0.0.0.0:9090"), "http://edge-1:9090");
        assert_eq!(url("[::]:9090"), "http://edge-1:9090");
        assert_eq!(url("10.0.0.5:9090"), "http://10.0.0.5:9090");
        assert_eq!(url("[fd00::5]:9090"), "http://[fd00::5]:9090");
    }
}
