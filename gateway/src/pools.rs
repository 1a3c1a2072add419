//! Upstream pools: interchangeable backends, a selection policy, and active
//! HTTP health checks.
//!
//! Each configured pool becomes a Pingora `LoadBalancer` whose health checker
//! runs as a background service: a backend that fails `health_failures`
//! probes in a row (one every `health_interval_ms`, each allowed
//! `health_timeout_ms`) leaves rotation, and comes back after as many good
//! ones. One slow probe from a backend busy with a sale does not eject it. The proxy asks [`Pool::select`] for a backend,
//! optionally excluding the one a failed attempt just used so a retry lands
//! elsewhere.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pingora::http::RequestHeader;
use pingora::lb::health_check::HttpHealthCheck;
use pingora::lb::selection::{Consistent, RoundRobin};
use pingora::lb::{Backend, LoadBalancer};
use pingora::services::background::{background_service, GenBackgroundService};
use seckill_contracts::config::{PoolConfig, RouteConfig, Selection};

/// How many backends selection may walk past (unhealthy or excluded).
const MAX_SELECT_ITERATIONS: usize = 256;

/// The balancer behind a pool, by policy.
enum Balancer {
    RoundRobin(Arc<LoadBalancer<RoundRobin>>),
    ConsistentHash(Arc<LoadBalancer<Consistent>>),
}

/// One named pool.
pub struct Pool {
    pub name: String,
    pub config: PoolConfig,
    balancer: Balancer,
}

/// A background service that must be added to the Pingora server so the
/// pool's health checks run.
pub enum HealthService {
    RoundRobin(GenBackgroundService<LoadBalancer<RoundRobin>>),
    ConsistentHash(GenBackgroundService<LoadBalancer<Consistent>>),
}

/// Why a pool could not be built from configuration.
#[derive(Debug, thiserror::Error)]
#[error("pool `{pool}`: {reason}")]
pub struct PoolError {
    pool: String,
    reason: String,
}

/// Health of one backend, for `/admin/upstreams` and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendHealth {
    pub addr: String,
    pub healthy: bool,
}

impl Pool {
    /// Builds the pool and the background service that health-checks it.
    pub fn build(name: &str, config: &PoolConfig) -> Result<(Arc<Pool>, HealthService), PoolError> {
        let err = |reason: String| PoolError {
            pool: name.to_string(),
            reason,
        };
        let health_check = || -> Result<Box<HttpHealthCheck>, PoolError> {
            let mut hc = HttpHealthCheck::new("localhost", false);
            let mut req = RequestHeader::build("GET", config.health_path.as_bytes(), None)
                .map_err(|e| err(format!("health path: {e}")))?;
            req.append_header("Host", "localhost")
                .map_err(|e| err(format!("health request: {e}")))?;
            hc.req = req;
            let probe_timeout = Duration::from_millis(config.health_timeout_ms.max(1));
            hc.peer_template.options.connection_timeout = Some(probe_timeout);
            hc.peer_template.options.read_timeout = Some(probe_timeout);
            hc.consecutive_failure = config.health_failures.max(1);
            hc.consecutive_success = config.health_failures.max(1);
            Ok(Box::new(hc))
        };
        let frequency = Some(Duration::from_millis(config.health_interval_ms.max(50)));
        let backends = config.backends.iter().map(String::as_str);
        let (balancer, service) = match config.selection {
            Selection::RoundRobin => {
                let mut lb = LoadBalancer::<RoundRobin>::try_from_iter(backends)
                    .map_err(|e| err(e.to_string()))?;
                lb.set_health_check(health_check()?);
                lb.health_check_frequency = frequency;
                let service = background_service(&format!("health check {name}"), lb);
                let task = service.task();
                (
                    Balancer::RoundRobin(task),
                    HealthService::RoundRobin(service),
                )
            }
            Selection::ConsistentHashUser => {
                let mut lb = LoadBalancer::<Consistent>::try_from_iter(backends)
                    .map_err(|e| err(e.to_string()))?;
                lb.set_health_check(health_check()?);
                lb.health_check_frequency = frequency;
                let service = background_service(&format!("health check {name}"), lb);
                let task = service.task();
                (
                    Balancer::ConsistentHash(task),
                    HealthService::ConsistentHash(service),
                )
            }
        };
        let pool = Pool {
            name: name.to_string(),
            config: config.clone(),
            balancer,
        };
        Ok((Arc::new(pool), service))
    }

    /// Picks a healthy backend. `key` matters only for consistent hashing
    /// (the user id); `exclude` skips the backend a failed attempt used.
    pub fn select(&self, key: &[u8], exclude: Option<SocketAddr>) -> Option<Backend> {
        let accept = |b: &Backend, healthy: bool| {
            healthy && exclude.is_none_or(|x| b.addr.as_inet().copied() != Some(x))
        };
        match &self.balancer {
            Balancer::RoundRobin(lb) => lb.select_with(key, MAX_SELECT_ITERATIONS, accept),
            Balancer::ConsistentHash(lb) => lb.select_with(key, MAX_SELECT_ITERATIONS, accept),
        }
    }

    /// Every backend with its current health.
    pub fn health(&self) -> Vec<BackendHealth> {
        match &self.balancer {
            Balancer::RoundRobin(lb) => health_of(lb),
            Balancer::ConsistentHash(lb) => health_of(lb),
        }
    }
}

fn health_of<S>(lb: &LoadBalancer<S>) -> Vec<BackendHealth>
where
    S: pingora::lb::selection::BackendSelection + 'static,
    S::Iter: pingora::lb::selection::BackendIter,
{
    let backends = lb.backends();
    backends
        .get_backend()
        .iter()
        .map(|b| BackendHealth {
            addr: b.addr.to_string(),
            healthy: backends.ready(b),
        })
        .collect()
}

/// Pools by name.
pub type Pools = BTreeMap<String, Arc<Pool>>;

/// Builds every configured pool that a route uses, with the health
/// services to run. A pool no route names (the built-in defaults carry a
/// `wallet` pool that a file's own route list may not use) is neither
/// built nor health-checked: probing backends nobody sends to would only
/// fill the log with failures.
pub fn build_all(
    configs: &BTreeMap<String, PoolConfig>,
    routes: &[RouteConfig],
) -> Result<(Pools, Vec<HealthService>), PoolError> {
    let mut pools = BTreeMap::new();
    let mut services = Vec::new();
    for (name, config) in configs {
        if !routes
            .iter()
            .any(|r| r.pool.as_deref() == Some(name.as_str()))
        {
            tracing::info!(pool = %name, "no route uses this pool; not started");
            continue;
        }
        let (pool, service) = Pool::build(name, config)?;
        pools.insert(name.clone(), pool);
        services.push(service);
    }
    Ok((pools, services))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pools_a_route_uses_are_built() {
        let pool = |addr: &str| PoolConfig {
            backends: vec![addr.into()],
            ..PoolConfig::default()
        };
        let configs = BTreeMap::from([
            ("api".to_string(), pool("127.0.0.1:1")),
            ("wallet".to_string(), pool("127.0.0.1:2")),
        ]);
        let routes = vec![RouteConfig::proxied("api", "*", "/api/v1/{*rest}", false)];
        let (pools, services) = build_all(&configs, &routes).unwrap();
        assert_eq!(pools.keys().collect::<Vec<_>>(), ["api"]);
        assert_eq!(services.len(), 1);
    }
}
