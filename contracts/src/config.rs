//! One configuration for every process of the platform.
//!
//! Data flows in three layers, later ones winning: the built-in defaults of
//! these structs, one TOML file (a commented dev default lives at
//! `deploy/seckill.toml`), then environment variables named
//! `SECKILL__<SECTION>__<KEY>` (for example `SECKILL__REDIS__URL`). Every
//! process loads the same file and reads the sections it needs, so one file
//! describes one deployment. Secrets (the admin token, the JWT private key)
//! are never values in the file: the file names a path, or the environment
//! carries the value.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;

mod env;
mod payment;
pub use payment::{PaymentConfig, PaymentMode, WalletConfig, GROUP_COMMIT_MAX_LIMIT};
use serde::{Deserialize, Serialize};

/// The environment prefix; `__` separates nesting levels.
pub const ENV_PREFIX: &str = "SECKILL__";

/// Why a configuration could not be used. Every variant names the key so an
/// operator can fix the file without reading code.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an environment variable does not parse into the schema
    /// (wrong type, unknown enum value, bad address). Figment's message names
    /// the key path and where the value came from.
    #[error("configuration does not parse: {0}")]
    Parse(String),
    /// The file names a config file that does not exist.
    #[error("configuration file {path} cannot be read: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Values parse but contradict each other or are out of range.
    #[error("invalid configuration key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    /// A secret referenced by path could not be read.
    #[error("secret for `{key}` cannot be read from {path}: {source}")]
    Secret {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The whole deployment's configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub amqp: AmqpConfig,
    pub jwt: JwtConfig,
    pub gateway: GatewayConfig,
    pub api: ApiConfig,
    pub worker: WorkerConfig,
    pub wallet: WalletConfig,
    pub payment: PaymentConfig,
    pub log: LogConfig,
}

/// MySQL / MariaDB: the source of truth for users, sales and orders.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `mysql://user:password@host:port/database`.
    pub url: String,
    pub max_connections: u32,
    /// How long a caller waits for a pooled connection before failing.
    pub acquire_timeout_ms: u64,
    /// MariaDB ends a session that sits idle inside an open transaction
    /// for this long (its `idle_transaction_timeout`), so a process that
    /// died or was cut off from the network mid-transaction gives its row
    /// locks back (a sale's stock row, which every order of the sale
    /// updates) instead of holding them until TCP notices, hours later.
    /// Our transactions never wait between statements for anything but
    /// the database. 0 turns it off; servers without the variable (MySQL)
    /// ignore it.
    pub idle_transaction_timeout_secs: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "mysql://root@127.0.0.1:3306/seckill".into(),
            max_connections: 16,
            acquire_timeout_ms: 5_000,
            idle_transaction_timeout_secs: 30,
        }
    }
}

/// Redis holds the hot state: stock counters, reservations, paths, caches.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// One URL for a single node; several seed URLs when `cluster` is true.
    pub url: String,
    /// Extra seed nodes for Redis Cluster.
    pub cluster_nodes: Vec<String>,
    pub cluster: bool,
    /// Every key the platform writes starts with this, so deployments (and
    /// parallel tests) can share one Redis without seeing each other.
    pub key_prefix: String,
    /// With `cluster`: a cluster connection on which no call has come back
    /// (answer or error) for this long, while calls were waiting, is
    /// replaced by a fresh one (see `redis_client`). Longer than a call
    /// takes while a master fails over with other slots still answering;
    /// a client stuck in its own recovery is what it catches.
    pub cluster_stall_ms: u64,
}

impl RedisConfig {
    /// The nodes to reach Redis through: `url` alone for a single node;
    /// with `cluster`, `url` then `cluster_nodes` (the seeds).
    pub fn nodes(&self) -> Vec<String> {
        let mut nodes = vec![self.url.clone()];
        if self.cluster {
            nodes.extend(self.cluster_nodes.iter().cloned());
        }
        nodes
    }
}

/// A service address (`scheme://user:password@host/...`) for the logs,
/// without its password.
pub fn redacted_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/".into(),
            cluster_nodes: Vec::new(),
            cluster: false,
            key_prefix: "seckill".into(),
            cluster_stall_ms: 3_000,
        }
    }
}

/// RabbitMQ is the buffer between admission and the MySQL writes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    /// The broker every component connects to first.
    pub url: String,
    /// Other nodes of the same RabbitMQ cluster, tried in turn when the
    /// current one cannot be reached (see `brokers`): a lost connection
    /// reconnects to the next node that answers.
    pub failover_urls: Vec<String>,
    /// Durable direct exchange the gateway publishes admitted orders to.
    pub exchange: String,
    /// Durable queue the order workers consume.
    pub queue: String,
    /// Where poison messages go after `delivery_limit` attempts.
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    /// Declare queues as quorum queues (needs a RabbitMQ cluster to matter).
    pub quorum: bool,
    pub delivery_limit: u32,
    /// A publish not confirmed within this time is rolled back and answered 503.
    pub confirm_timeout_ms: u64,
    /// Delayed-close plumbing: unpaid orders wait here for their timeout.
    pub close_delay_queue: String,
    pub close_queue: String,
    /// `payment.mode = message`: the wallet's "debited" messages to the
    /// api, and the api's compensating refunds to the wallet.
    pub payment_queue: String,
    pub refund_queue: String,
}

impl AmqpConfig {
    /// Every broker to try, in order: `url`, then `failover_urls`.
    pub fn broker_urls(&self) -> Vec<&str> {
        std::iter::once(self.url.as_str())
            .chain(self.failover_urls.iter().map(String::as_str))
            .collect()
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            failover_urls: Vec::new(),
            exchange: "seckill.orders".into(),
            queue: "seckill.orders".into(),
            dead_letter_exchange: "seckill.orders.dlx".into(),
            dead_letter_queue: "seckill.orders.dlq".into(),
            quorum: false,
            delivery_limit: 5,
            confirm_timeout_ms: 2_000,
            close_delay_queue: "seckill.close.delay".into(),
            close_queue: "seckill.close".into(),
            payment_queue: "seckill.payments".into(),
            refund_queue: "seckill.refunds".into(),
        }
    }
}

/// One RS256 public key, picked by the token's `kid`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyConfig {
    pub kid: String,
    pub path: PathBuf,
}

/// Token issuing (api only) and checking (gateway and api).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    pub issuer: String,
    pub audience: String,
    /// Lifetime of an access token.
    pub ttl_secs: u64,
    /// Clock skew tolerated on `exp`/`nbf`; the contract caps it at 5 s.
    pub leeway_secs: u64,
    /// Which key the api signs with; must be one of `public_keys`.
    pub signing_kid: String,
    /// PEM private key; only the api process reads it.
    pub private_key_path: PathBuf,
    /// Every key that may verify a token; several at once during rotation.
    /// May be empty when keys come from a keyring (api) or a JWKS (gateway).
    pub public_keys: Vec<PublicKeyConfig>,
    /// The api's keyring folder (`seckillctl keys rotate` adds keys there);
    /// its keys verify and its current key signs, besides the ones above.
    pub keyring_dir: Option<PathBuf>,
    /// How often an api instance rereads the keyring.
    pub keyring_reload_secs: u64,
    /// A rotated key is published this long before it signs, so every api
    /// and gateway knows it before a token carries it.
    pub publish_ahead_secs: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            issuer: "seckill-api".into(),
            audience: "seckill".into(),
            ttl_secs: 7_200,
            leeway_secs: 5,
            signing_kid: "dev-1".into(),
            private_key_path: "var/keys/dev-1.private.pem".into(),
            public_keys: vec![PublicKeyConfig {
                kid: "dev-1".into(),
                path: "var/keys/dev-1.public.pem".into(),
            }],
            keyring_dir: None,
            keyring_reload_secs: 5,
            publish_ahead_secs: 15,
        }
    }
}

/// How a pool picks a backend for a request.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    #[default]
    RoundRobin,
    /// Consistent hashing on the verified user id, so one buyer sticks to one
    /// backend (warm per-user caches) while backends come and go.
    ConsistentHashUser,
}

/// A set of interchangeable upstream backends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    pub backends: Vec<String>,
    pub selection: Selection,
    /// Active health check path, probed over HTTP.
    pub health_path: String,
    pub health_interval_ms: u64,
    /// How long one probe may take. Kept apart from the interval: a backend
    /// busy with a sale answers `/healthz` slowly but is still serving, and
    /// ejecting it then only moves its load onto the others.
    pub health_timeout_ms: u64,
    /// Consecutive failed probes before a backend leaves rotation (and
    /// consecutive good ones before it returns). A dead backend refuses the
    /// connection at once, so it is gone after this many intervals.
    pub health_failures: usize,
    pub connect_timeout_ms: u64,
    pub read_timeout_ms: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            backends: Vec::new(),
            selection: Selection::RoundRobin,
            health_path: "/healthz".into(),
            health_interval_ms: 500,
            health_timeout_ms: 1_000,
            health_failures: 2,
            connect_timeout_ms: 1_000,
            read_timeout_ms: 10_000,
        }
    }
}

/// One route of the edge: method + path pattern → a pool or a local answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name used in metrics and passed to the Lua rules as `req.route`.
    pub name: String,
    /// HTTP method, or `*` for any.
    pub method: String,
    /// Path pattern; `{name}` captures one segment, e.g.
    /// `/api/v1/seckill/{path}/{sale_id}`.
    pub path: String,
    /// Upstream pool; absent means the Lua rules must answer locally.
    #[serde(default)]
    pub pool: Option<String>,
    /// Public routes skip the JWT check.
    #[serde(default)]
    pub public: bool,
    /// Answered from the files of `gateway.web_dir` (the request path names
    /// the file, a folder its `index.html`), with no Lua and no upstream.
    #[serde(default)]
    pub files: bool,
    /// Edge micro-cache freshness of this route's pages, in ms (0: off).
    /// Public `GET` routes to a pool only: their answers are the same for
    /// every caller. See `gateway.micro_cache` for the rest of its rules.
    #[serde(default)]
    pub cache_ms: u64,
}

impl RouteConfig {
    /// A route the Lua rules answer at the edge (JWT checked).
    pub fn local(name: &str, method: &str, path: &str) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            method: method.into(),
            path: path.into(),
            pool: None,
            public: false,
            files: false,
            cache_ms: 0,
        }
    }

    /// The route with its pages micro-cached at the edge for `ms`.
    pub fn cached(self, ms: u64) -> RouteConfig {
        RouteConfig {
            cache_ms: ms,
            ..self
        }
    }

    /// A route proxied to the `api` pool.
    pub fn proxied(name: &str, method: &str, path: &str, public: bool) -> RouteConfig {
        RouteConfig {
            pool: Some("api".into()),
            public,
            ..RouteConfig::local(name, method, path)
        }
    }

    /// A public `GET` route answered from `gateway.web_dir`.
    pub fn files(name: &str, path: &str) -> RouteConfig {
        RouteConfig {
            public: true,
            files: true,
            ..RouteConfig::local(name, "GET", path)
        }
    }
}

/// The Pingora edge.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// How other processes reach the admin listener (the api, when the
    /// `/ops` dashboard reloads the rules on every gateway), e.g.
    /// `http://10.0.0.5:9090`. Empty: `http://<admin_listen>`, a wildcard
    /// bind advertised under the host's name.
    pub admin_url: String,
    /// Bearer token for the admin listener, read from this file...
    pub admin_token_path: Option<PathBuf>,
    /// ...or given directly (normally via `SECKILL__GATEWAY__ADMIN_TOKEN`).
    pub admin_token: Option<String>,
    /// Folder of rule files; `redis/` inside it holds the Redis scripts.
    pub rules_dir: PathBuf,
    /// Folder of the static files `files` routes serve (`web/`: the API
    /// reference, the storefront), read into memory at start-up.
    pub web_dir: PathBuf,
    /// Worker threads of the proxy service; one Lua VM each.
    pub threads: usize,
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    /// Lua instructions one phase call may run before it is aborted.
    pub lua_instruction_budget: u64,
    /// Memory cap of one Lua VM.
    pub lua_memory_bytes: usize,
    /// Wall-clock limit of one phase call, its I/O waits included.
    pub lua_call_timeout_ms: u64,
    /// Time kept at the end of a rule call for giving a reservation back
    /// when the publish fails: the publish may use only what the call has
    /// left minus this, so the rollback and the buyer's 503 always fit.
    pub rollback_reserve_ms: u64,
    /// Verified tokens kept to skip RSA on a buyer's repeated requests.
    pub jwt_cache_entries: u64,
    /// Seconds given to in-flight requests after SIGTERM.
    pub drain_secs: u64,
    /// How long a gateway trusts its local copy of a sale's info (window,
    /// stock_total) before re-reading it; a `updated` notice drops it sooner.
    pub sale_info_ttl_ms: u64,
    /// How long a local sold-out mark lives without a fresh notice: after
    /// it, one request asks Redis again (a missed `reopened` notice costs at
    /// most this long of answering "sold out" wrongly).
    pub sold_out_mark_ttl_ms: u64,

    // Client connections before a whole request header has arrived: how
    // long a client may take and how much memory it may hold. Defaults are
    // nginx's; the gateway's `header_gate` module enforces them.
    /// A request header must be complete this long after the connection is
    /// accepted, or after the first byte of a later request on a kept-alive
    /// connection; otherwise 408 (if any byte came) and close. nginx's
    /// `client_header_timeout`.
    pub client_header_timeout_ms: u64,
    /// A kept-alive connection is closed after this long without the first
    /// byte of its next request. nginx's `keepalive_timeout`.
    pub keepalive_timeout_ms: u64,
    /// The header buffer a connection gets once its first bytes arrive (an
    /// idle connection holds none); it doubles up to `max_header_bytes`.
    /// nginx's `client_header_buffer_size`.
    pub header_buffer_bytes: usize,
    /// Idle connections to the backends kept for reuse, across all pools
    /// (nginx's upstream `keepalive`). A burst of proxied requests (a
    /// crowd paying at once) opens one connection per request in flight;
    /// those kept here serve the next burst without a new connection on
    /// both ends, which costs the gateway and the api more than the
    /// request itself. At least one per thread (`threads`).
    pub upstream_keepalive_pool: usize,

    /// Refreshing the verification keys from the api's JWKS.
    pub jwks: JwksConfig,
    /// Rules from versioned bundles in Redis instead of `rules_dir` alone.
    pub bundles: BundlesConfig,
    /// The edge's cache of public pages (routes with `cache_ms`).
    pub micro_cache: MicroCacheConfig,

    pub pools: BTreeMap<String, PoolConfig>,
    pub routes: Vec<RouteConfig>,
}

/// The edge micro-cache of public pages (`GET /api/v1/sales` and a sale's
/// page, the most-hit pages before a sale opens): each route's freshness
/// is its `cache_ms`; these bound the rest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MicroCacheConfig {
    /// After its freshness a page is still served this long while one
    /// request refreshes it (stale-while-revalidate); older, it is a miss.
    pub stale_ms: u64,
    /// Pages kept per gateway; past it, new keys go upstream uncached.
    pub max_entries: usize,
    /// Larger answers are passed through, not stored.
    pub max_body_bytes: usize,
    /// How long a request waits for another's fetch of the same page
    /// before it goes upstream itself.
    pub wait_ms: u64,
}

impl Default for MicroCacheConfig {
    fn default() -> Self {
        Self {
            stale_ms: 5_000,
            max_entries: 10_000,
            max_body_bytes: 256 * 1024,
            wait_ms: 2_000,
        }
    }
}

/// Rules bundles pushed with `seckillctl rules push` (see `rules_bundle`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BundlesConfig {
    /// Follow the fleet's bundles; off, the gateway runs `rules_dir` only.
    pub enabled: bool,
    /// How often the gateway looks for a staged or switched bundle and
    /// reports its state.
    pub poll_ms: u64,
    /// This gateway's name in `seckillctl rules status`; empty means
    /// `<hostname>:<listen port>`.
    pub id: String,
    /// How long a starting gateway keeps trying to read the active bundle
    /// before it starts on `rules_dir` (and switches once Redis answers).
    pub startup_wait_ms: u64,
}

impl Default for BundlesConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            poll_ms: 500,
            id: String::new(),
            startup_wait_ms: 10_000,
        }
    }
}

/// Where and how often a gateway refreshes its keys from a JWKS.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JwksConfig {
    /// JWKS addresses tried in order until one answers; empty turns the
    /// refresh off (only `jwt.public_keys` verify).
    pub urls: Vec<String>,
    /// Background refresh period.
    pub refresh_secs: u64,
    /// At most one fetch per this period, whatever triggers it: a flood of
    /// tokens with made-up kids costs the api one request a second.
    pub min_fetch_interval_ms: u64,
    /// One fetch attempt's limit (connect and body).
    pub fetch_timeout_ms: u64,
    /// With no `jwt.public_keys`, how long a starting gateway keeps trying
    /// to get a first key set before it gives up.
    pub startup_wait_ms: u64,
}

impl JwksConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (i, url) in self.urls.iter().enumerate() {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(
                    format!("gateway.jwks.urls[{i}]"),
                    "must be an http:// or https:// address",
                ));
            }
        }
        for (key, value) in [
            ("refresh_secs", self.refresh_secs),
            ("min_fetch_interval_ms", self.min_fetch_interval_ms),
            ("fetch_timeout_ms", self.fetch_timeout_ms),
        ] {
            if value == 0 {
                return Err(invalid(format!("gateway.jwks.{key}"), "must be at least 1"));
            }
        }
        Ok(())
    }
}

impl Default for JwksConfig {
    fn default() -> Self {
        Self {
            urls: Vec::new(),
            refresh_secs: 30,
            min_fetch_interval_ms: 1_000,
            fetch_timeout_ms: 2_000,
            startup_wait_ms: 30_000,
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        let api = PoolConfig {
            backends: vec!["127.0.0.1:8081".into(), "127.0.0.1:8082".into()],
            ..PoolConfig::default()
        };
        let wallet = PoolConfig {
            backends: vec!["127.0.0.1:8083".into()],
            ..PoolConfig::default()
        };
        Self {
            listen: ([127, 0, 0, 1], 8080).into(),
            admin_listen: ([127, 0, 0, 1], 9090).into(),
            admin_url: String::new(),
            admin_token_path: Some("var/keys/admin-token".into()),
            admin_token: None,
            rules_dir: "lua".into(),
            web_dir: "web".into(),
            threads: 2,
            max_header_bytes: 16 * 1024,
            max_body_bytes: 64 * 1024,
            lua_instruction_budget: 1_000_000,
            lua_memory_bytes: 32 * 1024 * 1024,
            lua_call_timeout_ms: 3_000,
            rollback_reserve_ms: 500,
            jwt_cache_entries: 100_000,
            drain_secs: 10,
            sale_info_ttl_ms: 5_000,
            sold_out_mark_ttl_ms: 2_000,
            client_header_timeout_ms: 60_000,
            keepalive_timeout_ms: 75_000,
            header_buffer_bytes: 1024,
            upstream_keepalive_pool: 2048,
            jwks: JwksConfig::default(),
            bundles: BundlesConfig::default(),
            micro_cache: MicroCacheConfig::default(),
            pools: BTreeMap::from([("api".to_string(), api), ("wallet".to_string(), wallet)]),
            routes: vec![
                RouteConfig::local("seckill", "POST", "/api/v1/seckill/{path}/{sale_id}"),
                RouteConfig::proxied("auth", "POST", "/api/v1/auth/{action}", true),
                RouteConfig::proxied("sales_list", "GET", "/api/v1/sales", true).cached(1_000),
                RouteConfig::proxied("sale_detail", "GET", "/api/v1/sales/{sale_id}", true)
                    .cached(1_000),
                RouteConfig::proxied("jwks", "GET", "/.well-known/jwks.json", true),
                RouteConfig::proxied("openapi", "GET", "/api/v1/openapi.json", true),
                RouteConfig::files("docs", "/api/docs"),
                RouteConfig::files("docs_assets", "/api/docs/{*asset}"),
                RouteConfig::files("storefront", "/"),
                RouteConfig::files("storefront_assets", "/store/{*asset}"),
                // The dashboard's data: the api checks the admin token, so
                // the edge passes it on without a JWT check.
                RouteConfig::proxied("ops_api", "*", "/ops/api/{*rest}", true),
                RouteConfig::files("ops", "/ops"),
                RouteConfig::files("ops_assets", "/ops/{*asset}"),
                // The buyer's wallet lives in the wallet service.
                RouteConfig {
                    pool: Some("wallet".into()),
                    ..RouteConfig::local("wallet", "GET", "/api/v1/wallet")
                },
                RouteConfig::proxied("api", "*", "/api/v1/{*rest}", false),
            ],
        }
    }
}

/// The HTTP backend behind the gateway.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Overridden per instance (`--listen` or `SECKILL__API__LISTEN`).
    pub listen: SocketAddr,
    /// Bearer token for the api's admin routes (sale creation).
    pub admin_token_path: Option<PathBuf>,
    pub admin_token: Option<String>,
    pub sale_cache_ttl_secs: u64,
    pub captcha_ttl_secs: u64,
    pub path_ttl_secs: u64,
    pub idempotency_key_ttl_secs: u64,
    /// Verified tokens kept so a buyer polling results costs no RSA
    /// (0 verifies every request).
    pub jwt_cache_entries: u64,
    /// Password hashes and captcha renders running at once (0: one per
    /// core); a burst beyond it queues instead of starving the machine.
    pub cpu_jobs: usize,
    /// Connections the kernel queues for the api before it accepts them
    /// (capped by `net.core.somaxconn`): a burst of buyers opens more at
    /// once than a busy api accepts, and a full queue drops them until the
    /// gateway's connect timeout answers 504.
    pub listen_backlog: u32,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 8081).into(),
            admin_token_path: Some("var/keys/admin-token".into()),
            admin_token: None,
            sale_cache_ttl_secs: 60,
            captcha_ttl_secs: 300,
            path_ttl_secs: 60,
            idempotency_key_ttl_secs: 600,
            jwt_cache_entries: 10_000,
            cpu_jobs: 0,
            listen_backlog: 4096,
        }
    }
}

/// The order consumers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// `/healthz` and `/metrics`; overridden per instance.
    pub listen: SocketAddr,
    pub prefetch: u16,
    /// At most this many messages per MySQL transaction...
    pub batch_size: usize,
    /// ...or whatever arrived within this many milliseconds.
    pub batch_max_wait_ms: u64,
    /// Unpaid orders close after this long.
    pub order_timeout_secs: u64,
    /// Period of the safety-net sweeper for overdue unpaid orders.
    pub sweep_interval_secs: u64,
    /// A reservation with no message after this long is released.
    pub reservation_timeout_secs: u64,
    /// Peak shaving: at most this many orders a second written by this
    /// worker process (all its consumers together); 0 writes as fast as
    /// MySQL takes them. A sell-out's orders then wait in the queue
    /// instead of all reaching MySQL in the opening second, while the
    /// edge is busiest: on the bench machine that took the hot-sale p99
    /// from about 50 to about 16 ms. On by default since the pace is
    /// bounded (`drain_pace_max_delay_ms`): it only ever delays an order,
    /// by at most that bound, and never lowers how many a second the
    /// workers write under a sustained load.
    pub drain_orders_per_sec: u32,
    /// The most the pace holds an order back, from its admission
    /// (`admitted_at_ms`): a batch whose oldest order is this old is
    /// written at once, whatever its turn. So the pace shapes the opening
    /// of a burst and then lets the rest drain at full speed, and no
    /// order can outwait its reservation (`reservation_timeout_secs`, an
    /// older unclaimed reservation is given back and its buyer's order
    /// fails), whatever the stock, the rate or the number of workers.
    /// Must be under `reservation_timeout_secs`.
    pub drain_pace_max_delay_ms: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 9191).into(),
            prefetch: 500,
            batch_size: 100,
            batch_max_wait_ms: 10,
            order_timeout_secs: 1_800,
            sweep_interval_secs: 30,
            reservation_timeout_secs: 60,
            drain_orders_per_sec: 300,
            drain_pace_max_delay_ms: 2_000,
        }
    }
}

/// Logging through `tracing`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// An `EnvFilter` directive; `RUST_LOG` wins when set.
    pub filter: String,
    /// One JSON object per line instead of human-readable text.
    pub json: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            filter: "info".into(),
            json: false,
        }
    }
}

impl Config {
    /// Defaults, then `path` (if given), then the process's `SECKILL__*`
    /// environment variables; then [`Config::validate`].
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, env::EnvVars::process(ENV_PREFIX))
    }

    /// [`Config::load`] with `vars` standing in for the process environment
    /// (name, value pairs; names without the `SECKILL__` prefix are
    /// ignored), so callers such as tests can give their own without
    /// touching `std::env`.
    pub fn load_from(
        path: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Self::load_with_env(path, env::EnvVars::new(ENV_PREFIX, vars))
    }

    fn load_with_env(path: Option<&Path>, env: env::EnvVars) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = path {
            // Figment silently skips a missing file; an operator who names a
            // file wants to hear that it is not there.
            if let Err(source) = std::fs::metadata(path) {
                return Err(ConfigError::File {
                    path: path.to_path_buf(),
                    source,
                });
            }
            figment = figment.merge(Toml::file(path));
        }
        let config: Config = figment
            .merge(env)
            .extract()
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Cross-field checks the type system cannot express.
    /// The publish of an admitted order gets what the rule call has left
    /// minus the rollback reserve; the broker's confirm timeout must fit in
    /// that, or every slow confirm would be cut by the call instead.
    fn validate_handoff_deadlines(&self) -> Result<(), ConfigError> {
        let g = &self.gateway;
        if g.rollback_reserve_ms == 0 || g.rollback_reserve_ms >= g.lua_call_timeout_ms {
            return Err(invalid(
                "gateway.rollback_reserve_ms",
                "must be at least 1 and less than gateway.lua_call_timeout_ms",
            ));
        }
        let publish_window = g.lua_call_timeout_ms - g.rollback_reserve_ms;
        if self.amqp.confirm_timeout_ms > publish_window {
            return Err(invalid(
                "amqp.confirm_timeout_ms",
                format!(
                    "must fit in gateway.lua_call_timeout_ms - gateway.rollback_reserve_ms \
                     ({publish_window} ms), so a failed publish still leaves time to give \
                     the reservation back"
                ),
            ));
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.database.url.is_empty() {
            return Err(invalid("database.url", "must not be empty"));
        }
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        if self.redis.key_prefix.is_empty() || self.redis.key_prefix.contains(['{', '}', ' ']) {
            return Err(invalid(
                "redis.key_prefix",
                "must be non-empty and contain no braces or spaces",
            ));
        }
        if self.redis.cluster_stall_ms < 500 {
            return Err(invalid(
                "redis.cluster_stall_ms",
                "must be at least 500 (shorter would replace a connection that is merely busy)",
            ));
        }
        if self.jwt.leeway_secs > 5 {
            return Err(invalid("jwt.leeway_secs", "must be at most 5"));
        }
        let keys_elsewhere = self.jwt.keyring_dir.is_some() || !self.gateway.jwks.urls.is_empty();
        if self.jwt.public_keys.is_empty() && !keys_elsewhere {
            return Err(invalid(
                "jwt.public_keys",
                "at least one key is required unless jwt.keyring_dir or gateway.jwks.urls is set",
            ));
        }
        for (i, key) in self.jwt.public_keys.iter().enumerate() {
            if key.kid.is_empty() || !key.kid.chars().all(is_kid_char) {
                return Err(invalid(
                    format!("jwt.public_keys[{i}].kid"),
                    "must be non-empty and use only letters, digits, '-', '_', '.'",
                ));
            }
        }
        if self.jwt.keyring_dir.is_none()
            && !self.jwt.public_keys.is_empty()
            && !self
                .jwt
                .public_keys
                .iter()
                .any(|k| k.kid == self.jwt.signing_kid)
        {
            return Err(invalid(
                "jwt.signing_kid",
                "must name one of jwt.public_keys so issued tokens verify",
            ));
        }
        if self.jwt.keyring_reload_secs == 0 {
            return Err(invalid("jwt.keyring_reload_secs", "must be at least 1"));
        }
        self.gateway.jwks.validate()?;
        if self.api.listen_backlog == 0 {
            return Err(invalid("api.listen_backlog", "must be at least 1"));
        }
        self.wallet.validate()?;
        self.payment.validate()?;
        // Groups hold connections while they run: leave some for the rest.
        let groups = self.payment.group_commits_in_flight;
        if groups >= self.database.max_connections || groups >= self.wallet.max_connections {
            return Err(invalid(
                "payment.group_commits_in_flight",
                "must be below database.max_connections and wallet.max_connections",
            ));
        }
        if self.gateway.bundles.poll_ms == 0 {
            return Err(invalid("gateway.bundles.poll_ms", "must be at least 1"));
        }
        let g = &self.gateway;
        if g.threads == 0 {
            return Err(invalid("gateway.threads", "must be at least 1"));
        }
        if g.lua_call_timeout_ms == 0 {
            return Err(invalid("gateway.lua_call_timeout_ms", "must be at least 1"));
        }
        self.validate_handoff_deadlines()?;
        if g.lua_instruction_budget == 0 {
            return Err(invalid(
                "gateway.lua_instruction_budget",
                "must be at least 1",
            ));
        }
        if g.sale_info_ttl_ms == 0 {
            return Err(invalid("gateway.sale_info_ttl_ms", "must be at least 1"));
        }
        if g.sold_out_mark_ttl_ms == 0 {
            return Err(invalid(
                "gateway.sold_out_mark_ttl_ms",
                "must be at least 1",
            ));
        }
        if g.client_header_timeout_ms == 0 {
            return Err(invalid(
                "gateway.client_header_timeout_ms",
                "must be at least 1",
            ));
        }
        if g.keepalive_timeout_ms == 0 {
            return Err(invalid(
                "gateway.keepalive_timeout_ms",
                "must be at least 1",
            ));
        }
        if g.upstream_keepalive_pool < g.threads {
            // Pingora keeps a connection it was told to evict when its
            // pool has no room at all; one per thread is the least.
            return Err(invalid(
                "gateway.upstream_keepalive_pool",
                "must be at least gateway.threads",
            ));
        }
        if g.header_buffer_bytes == 0 || g.header_buffer_bytes > g.max_header_bytes {
            return Err(invalid(
                "gateway.header_buffer_bytes",
                "must be at least 1 and at most gateway.max_header_bytes",
            ));
        }
        for (name, pool) in &g.pools {
            if pool.backends.is_empty() {
                return Err(invalid(
                    format!("gateway.pools.{name}.backends"),
                    "a pool needs at least one backend",
                ));
            }
            for (i, b) in pool.backends.iter().enumerate() {
                if b.parse::<SocketAddr>().is_err() {
                    return Err(invalid(
                        format!("gateway.pools.{name}.backends[{i}]"),
                        format!("`{b}` is not an ip:port address"),
                    ));
                }
            }
            if !pool.health_path.starts_with('/') {
                return Err(invalid(
                    format!("gateway.pools.{name}.health_path"),
                    "must start with '/'",
                ));
            }
            if pool.health_failures == 0 {
                return Err(invalid(
                    format!("gateway.pools.{name}.health_failures"),
                    "must be at least 1",
                ));
            }
            if pool.health_timeout_ms == 0 {
                return Err(invalid(
                    format!("gateway.pools.{name}.health_timeout_ms"),
                    "must be at least 1",
                ));
            }
        }
        for (i, route) in g.routes.iter().enumerate() {
            if !route.path.starts_with('/') {
                return Err(invalid(
                    format!("gateway.routes[{i}].path"),
                    "must start with '/'",
                ));
            }
            if route.files && route.pool.is_some() {
                return Err(invalid(
                    format!("gateway.routes[{i}].files"),
                    "a route serves files or goes to a pool, not both",
                ));
            }
            if route.cache_ms > 0
                && (!route.public || route.pool.is_none() || route.method != "GET")
            {
                return Err(invalid(
                    format!("gateway.routes[{i}].cache_ms"),
                    "only public GET routes to a pool may be cached: their pages are the same for every caller",
                ));
            }
            if let Some(pool) = &route.pool {
                if !g.pools.contains_key(pool) {
                    return Err(invalid(
                        format!("gateway.routes[{i}].pool"),
                        format!("no pool named `{pool}` in gateway.pools"),
                    ));
                }
            }
        }
        let w = &self.worker;
        if w.batch_size == 0 {
            return Err(invalid("worker.batch_size", "must be at least 1"));
        }
        if w.prefetch == 0 {
            return Err(invalid("worker.prefetch", "must be at least 1"));
        }
        if w.order_timeout_secs == 0 {
            return Err(invalid("worker.order_timeout_secs", "must be at least 1"));
        }
        if w.drain_pace_max_delay_ms >= w.reservation_timeout_secs.saturating_mul(1_000) {
            return Err(invalid(
                "worker.drain_pace_max_delay_ms",
                "must be under worker.reservation_timeout_secs",
            ));
        }
        if self.amqp.delivery_limit == 0 {
            return Err(invalid("amqp.delivery_limit", "must be at least 1"));
        }
        for (i, url) in self.amqp.failover_urls.iter().enumerate() {
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                return Err(invalid(
                    format!("amqp.failover_urls[{i}]"),
                    "must be an amqp:// or amqps:// address",
                ));
            }
        }
        Ok(())
    }
}

fn is_kid_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Reads a secret from `value` (preferred, usually from the environment) or
/// from the file at `path`, trimming the trailing newline editors add.
pub fn read_secret(
    key: &str,
    value: Option<&str>,
    path: Option<&Path>,
) -> Result<String, ConfigError> {
    if let Some(v) = value.filter(|v| !v.is_empty()) {
        return Ok(v.to_string());
    }
    let Some(path) = path else {
        return Err(invalid(key, "no value and no path given"));
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Secret {
        key: key.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    let text = text.trim().to_string();
    if text.is_empty() {
        return Err(invalid(key, format!("{} is empty", path.display())));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Loads `toml` with `env` as the whole environment (names without the
    /// prefix). The process environment is never touched: another test
    /// thread may be reading it.
    fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(toml.as_bytes()).expect("write");
        let vars = env
            .iter()
            .map(|(k, v)| (format!("{ENV_PREFIX}{k}"), v.to_string()));
        Config::load_from(Some(file.path()), vars)
    }

    #[test]
    fn only_the_given_environment_is_read() {
        // Whatever the process environment holds, an empty source means
        // defaults plus the file.
        let c = Config::load_from(None, std::iter::empty()).expect("defaults load");
        assert_eq!(c, Config::default());
        let c = load_str("", &[("REDIS__KEY_PREFIX", "from-source")]).expect("loads");
        assert_eq!(c.redis.key_prefix, "from-source");
    }

    #[test]
    fn env_errors_name_the_variable() {
        let err = load_str("", &[("WORKER__BATCH_SIZE", "-3")]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("SECKILL__WORKER__BATCH_SIZE"), "{msg}");
    }

    #[test]
    fn keys_may_come_only_from_a_keyring_or_a_jwks() {
        let none = "[jwt]\npublic_keys = []\n";
        let err = load_str(none, &[]).unwrap_err();
        assert!(err.to_string().contains("jwt.public_keys"), "{err}");
        let jwks = "[jwt]\npublic_keys = []\n[gateway.jwks]\nurls = [\"http://api/jwks\"]\n";
        assert!(load_str(jwks, &[]).is_ok());
        let keyring = "[jwt]\npublic_keys = []\nkeyring_dir = \"var/keys\"\n";
        assert!(load_str(keyring, &[]).is_ok());
        let bad_url = "[gateway.jwks]\nurls = [\"ftp://api/jwks\"]\n";
        let err = load_str(bad_url, &[]).unwrap_err();
        assert!(err.to_string().contains("gateway.jwks.urls[0]"), "{err}");
        let zero = "[gateway.jwks]\nmin_fetch_interval_ms = 0\n";
        let err = load_str(zero, &[]).unwrap_err();
        assert!(err.to_string().contains("min_fetch_interval_ms"), "{err}");
    }

    #[test]
    fn dev_default_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/seckill.toml");
        Config::load(Some(&path)).expect("deploy/seckill.toml must load");
    }

    #[test]
    fn env_overrides_file() {
        let c = load_str(
            "[redis]\nurl = \"redis://file/\"\n",
            &[("REDIS__URL", "redis://env/"), ("WORKER__BATCH_SIZE", "7")],
        )
        .expect("loads");
        assert_eq!(c.redis.url, "redis://env/");
        assert_eq!(c.worker.batch_size, 7);
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = load_str("[worker]\nbatch_size = \"many\"\n", &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("worker.batch_size"), "{msg}");
    }

    #[test]
    fn unknown_key_is_refused() {
        let err = load_str("[redis]\nulr = \"x\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("ulr"), "{err}");
    }

    #[test]
    fn bad_address_names_the_key() {
        let err = load_str("[gateway]\nlisten = \"nowhere\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("gateway.listen"), "{err}");
    }

    #[test]
    fn client_connection_limits_must_be_set() {
        for (toml, key) in [
            (
                "client_header_timeout_ms = 0",
                "gateway.client_header_timeout_ms",
            ),
            ("keepalive_timeout_ms = 0", "gateway.keepalive_timeout_ms"),
            ("header_buffer_bytes = 0", "gateway.header_buffer_bytes"),
            ("header_buffer_bytes = 99999", "gateway.header_buffer_bytes"),
            (
                "upstream_keepalive_pool = 0",
                "gateway.upstream_keepalive_pool",
            ),
            (
                "threads = 4\nupstream_keepalive_pool = 3",
                "gateway.upstream_keepalive_pool",
            ),
        ] {
            let err = load_str(&format!("[gateway]\n{toml}\n"), &[]).unwrap_err();
            assert!(err.to_string().contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn the_drain_pace_holds_no_order_past_its_reservation() {
        let err = load_str(
            "[worker]\nreservation_timeout_secs = 2\ndrain_pace_max_delay_ms = 2000\n",
            &[],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("worker.drain_pace_max_delay_ms"),
            "{err}"
        );
        let ok = load_str(
            "[worker]\nreservation_timeout_secs = 3\ndrain_pace_max_delay_ms = 2999\n",
            &[],
        );
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn passwords_stay_out_of_the_logs() {
        assert_eq!(
            redacted_url("amqp://guest:secret@10.0.0.5:5672/%2f"),
            "amqp://guest:***@10.0.0.5:5672/%2f"
        );
        assert_eq!(
            redacted_url("redis://:secret@10.0.0.6:6379/"),
            "redis://:***@10.0.0.6:6379/"
        );
        assert_eq!(redacted_url("amqp://10.0.0.5:5672"), "amqp://10.0.0.5:5672");
    }

    #[test]
    fn redis_nodes_are_the_seeds_only_on_a_cluster() {
        let mut r = RedisConfig {
            cluster_nodes: vec!["redis://b/".into()],
            ..RedisConfig::default()
        };
        assert_eq!(r.nodes(), vec![r.url.clone()]);
        r.cluster = true;
        assert_eq!(r.nodes(), vec![r.url.clone(), "redis://b/".to_string()]);
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let err = load_str("[jwt]\nleeway_secs = 30\n", &[]).unwrap_err();
        assert!(err.to_string().contains("jwt.leeway_secs"), "{err}");
        let err = load_str(
            "[[gateway.routes]]\nname='x'\nmethod='GET'\npath='/x'\npool='nope'\n",
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("gateway.routes[0].pool"), "{err}");
        let err = load_str("[amqp]\nfailover_urls = ['http://x']\n", &[]).unwrap_err();
        assert!(err.to_string().contains("amqp.failover_urls[0]"), "{err}");
        let err = load_str(
            "[[gateway.routes]]\nname='x'\nmethod='GET'\npath='/x'\ncache_ms=1000\n",
            &[],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("gateway.routes[0].cache_ms"),
            "{err}"
        );
        let err = load_str("[redis]\nkey_prefix = 'a{b}'\n", &[]).unwrap_err();
        assert!(err.to_string().contains("redis.key_prefix"), "{err}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/seckill.toml"))).unwrap_err();
        assert!(matches!(err, ConfigError::File { .. }));
    }

    #[test]
    fn secret_prefers_value_then_file() {
        assert_eq!(read_secret("k", Some("v"), None).unwrap(), "v");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "from-file").unwrap();
        assert_eq!(read_secret("k", None, Some(f.path())).unwrap(), "from-file");
        assert!(read_secret("k", None, Some(Path::new("/nope"))).is_err());
        assert!(read_secret("k", None, None).is_err());
    }
}
