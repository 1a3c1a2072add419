//! Assembling the Pingora server from configuration: config → services →
//! proxy, as in Pingora's own examples.
//!
//! [`Gateway::build`] does everything that can fail (reading keys, parsing
//! routes, building pools) before anything listens, so a bad deployment dies
//! at start with a clear error. [`Gateway::run`] then blocks on Pingora's
//! runtime until the shutdown signal: SIGTERM drains in-flight requests
//! (`drain_secs`), SIGQUIT hands the listening sockets to a new process
//! (Pingora's graceful upgrade).

use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignalWatch};
use pingora::services::listening::Service;
use seckill_contracts::config::{read_secret, Config, ConfigError, GatewayConfig};

use std::sync::Arc;

use pingora::services::background::background_service;

use crate::admin::AdminApp;
use crate::drain::DrainWatch;
use crate::fleet_report::FleetReporter;
use crate::header_gate::{self, GateLimits, HeaderGate};
use crate::key_refresh::{self, KeyRefreshService, KeySetupError};
use crate::pools::{self, HealthService, PoolError};
use crate::proxy::{EdgeProxy, RequestLimits};
use crate::routes::{RouteError, RouteTable};
use crate::rules::bundles::{self, BundleFollower};
use crate::rules::{Limits, RuleEngine, RuleError, RuleWatcher};
use crate::services::HostServices;
use crate::web_files::{WebFiles, WebFilesError};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Keys(#[from] KeySetupError),
    #[error("rules in {dir}: {source}")]
    Rules { dir: String, source: RuleError },
    #[error(transparent)]
    Web(#[from] WebFilesError),
    #[error("pingora: {0}")]
    Pingora(String),
}

/// A built, not yet running, gateway.
pub struct Gateway {
    server: Server,
}

impl Gateway {
    /// Builds every service. `upgrade` takes over listening sockets from a
    /// running old process (Pingora's graceful upgrade via `upgrade_sock`).
    pub fn build(config: &Config, upgrade: bool) -> Result<Gateway, GatewayError> {
        let g = &config.gateway;
        let admin_token = read_secret(
            "gateway.admin_token",
            g.admin_token.as_deref(),
            g.admin_token_path.as_deref(),
        )?;
        let routes = RouteTable::new(&g.routes)?;
        let (pools, health_services) = pools::build_all(&g.pools, &g.routes)?;
        let keys = key_refresh::build(config)?;
        let (rules, running_bundle) = load_rules(config)?;
        let rules = Arc::new(rules);
        let web = Arc::new(WebFiles::load(&g.web_dir)?);

        let mut server = Server::new_with_opt_and_conf(
            Some(Opt {
                upgrade,
                ..Opt::default()
            }),
            server_conf(g),
        );
        server.bootstrap();

        let request_limits = RequestLimits {
            max_header_bytes: g.max_header_bytes,
            max_body_bytes: g.max_body_bytes,
        };
        let proxy = EdgeProxy::new(
            routes,
            pools.clone(),
            keys.clone(),
            rules.clone(),
            web,
            crate::micro_cache::MicroCache::new(g.micro_cache.clone()),
            request_limits,
        );
        // Pingora's proxy behind the header gate: slow, idle and half-open
        // clients are timed out and counted before the proxy sees them.
        let proxy = pingora::proxy::http_proxy(&server.configuration, proxy);
        let mut proxy_service = Service::new(
            "edge proxy".to_string(),
            HeaderGate::new(proxy, GateLimits::from_config(g)),
        );
        proxy_service.add_listener(header_gate::listener(&g.listen.to_string()));
        server.add_service(proxy_service);

        let mut admin = Service::new(
            "admin".to_string(),
            AdminApp::new(
                admin_token,
                pools.clone(),
                rules.clone(),
                keys.clone(),
                g.bundles.enabled,
            ),
        );
        admin.add_tcp(&g.admin_listen.to_string());
        server.add_service(admin);

        if g.bundles.enabled {
            // The fleet's bundles are the source; a local edit would split
            // this gateway from the others.
            let follower = BundleFollower::new(rules.clone(), config, running_bundle);
            server.add_service(background_service("rules bundles", follower));
        } else {
            server.add_service(background_service(
                "rule watcher",
                RuleWatcher::new(rules.clone()),
            ));
        }
        server.add_service(background_service(
            "fleet report",
            FleetReporter::new(config, rules.clone(), pools),
        ));
        server.add_service(background_service("drain watch", DrainWatch));
        server.add_service(background_service("key refresh", KeyRefreshService(keys)));
        add_health_checks(&mut server, health_services);
        Ok(Gateway { server })
    }

    /// Runs until `shutdown` fires (or, with `None`, until SIGTERM/SIGINT/SIGQUIT).
    pub fn run(self, shutdown: Option<Box<dyn ShutdownSignalWatch>>) {
        let args = match shutdown {
            Some(shutdown_signal) => RunArgs { shutdown_signal },
            None => RunArgs::default(),
        };
        self.server.run(args);
    }
}

/// The rules compiled with the configured limits: the fleet's active bundle
/// when bundles are on and one exists (its version is returned), else the
/// rules folder. A gateway does not start on rules that do not load.
fn load_rules(config: &Config) -> Result<(RuleEngine, Option<u64>), GatewayError> {
    let g = &config.gateway;
    let services = Arc::new(HostServices::new(config));
    let limits = limits(g);
    let rules_error = |source| GatewayError::Rules {
        dir: g.rules_dir.display().to_string(),
        source,
    };
    let active = if g.bundles.enabled {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| GatewayError::Pingora(format!("bundle start-up runtime: {e}")))?
            .block_on(bundles::load_active(config))
    } else {
        None
    };
    match active {
        Some(bundle) => {
            let version = bundle.version;
            let engine = RuleEngine::from_files(
                &g.rules_dir,
                bundle.files,
                version,
                g.threads,
                limits,
                services,
            )
            .map_err(rules_error)?;
            Ok((engine, Some(version)))
        }
        None => Ok((
            RuleEngine::load(&g.rules_dir, g.threads, limits, services).map_err(rules_error)?,
            None,
        )),
    }
}

/// Compiles and selftests `dir` with this config's limits, as a reload
/// would; the rules' hash, or why they are refused.
pub fn check_rules(config: &Config, dir: &std::path::Path) -> Result<String, RuleError> {
    let services = Arc::new(HostServices::new(config));
    let engine = RuleEngine::load(dir, 1, limits(&config.gateway), services)?;
    Ok(engine.status().hash)
}

fn limits(g: &GatewayConfig) -> Limits {
    Limits {
        instruction_budget: g.lua_instruction_budget,
        memory_bytes: g.lua_memory_bytes,
        call_timeout: std::time::Duration::from_millis(g.lua_call_timeout_ms),
    }
}

fn server_conf(g: &GatewayConfig) -> ServerConf {
    ServerConf {
        threads: g.threads,
        // One single-threaded runtime per proxy thread: a request stays
        // on the thread that accepted it, so each thread's Lua VM is
        // only ever touched by that thread (see `rules`), with no lock
        // contention and no task migration between cores.
        work_stealing: false,
        // After SIGTERM the listeners close at once; connections already
        // accepted get `drain_secs` to finish before the runtimes stop.
        grace_period_seconds: Some(g.drain_secs),
        graceful_shutdown_timeout_seconds: Some(1),
        // Pingora's figure is per thread (its pool holds threads × it).
        upstream_keepalive_pool_size: g.upstream_keepalive_pool.div_ceil(g.threads.max(1)),
        upgrade_sock: format!("/tmp/seckill-gateway-{}.sock", g.listen.port()),
        pid_file: format!("/tmp/seckill-gateway-{}.pid", g.listen.port()),
        ..ServerConf::default()
    }
}

fn add_health_checks(server: &mut Server, health_services: Vec<HealthService>) {
    for service in health_services {
        match service {
            HealthService::RoundRobin(s) => {
                server.add_service(s);
            }
            HealthService::ConsistentHash(s) => {
                server.add_service(s);
            }
        }
    }
}
