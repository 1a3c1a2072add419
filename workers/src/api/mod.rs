//! The api service: the HTTP backend the gateway load-balances to.
//!
//! [`serve`] takes the shared [`ApiState`], an already-bound listener and a
//! shutdown future, so tests run it in-process on port 0 and binaries run it
//! on the configured port. Requests flow gateway → here → MySQL/Redis. One
//! module per concern:
//!
//! | module | routes |
//! |---|---|
//! | [`auth`] | `POST /api/v1/auth/register`, `POST /api/v1/auth/login` |
//! | [`sales_cache`] | `GET /api/v1/sales`, `GET /api/v1/sales/{id}` (cache-aside) |
//! | [`captcha`] | `GET /api/v1/sales/{id}/captcha` |
//! | [`hidden_path`] | `POST /api/v1/sales/{id}/path` |
//! | [`results`] | `GET /api/v1/sales/{id}/result` |
//! | [`idempotency`] | `GET /api/v1/idempotency-key` |
//! | [`orders`] | `GET /api/v1/orders`, `GET /api/v1/orders/{id}`, `POST /api/v1/orders/{id}/pay`, `POST /api/v1/orders/{id}/cancel` |
//! | [`jwks`] | `GET /.well-known/jwks.json` (the public keys, public) |
//! | [`openapi`] | `GET /api/v1/openapi.json`, `GET /api/docs` (the document, rendered) |
//! | [`admin`] | `POST /admin/sales` (admin bearer token) |
//! | [`ops`] | `/ops/api/...`: the live dashboard's data and actions (admin bearer token) |
//!
//! plus `/healthz` and `/metrics` from [`crate::probes`]. [`identity`]
//! re-verifies the bearer token on every authenticated route and
//! [`problem`] makes every error RFC 9457 problem+json; [`cpu_work`] bounds
//! the CPU-heavy work (argon2, captcha PNGs) a burst can start at once.

pub mod admin;
pub mod auth;
pub mod captcha;
pub mod cpu_work;
pub mod hidden_path;
pub mod idempotency;
pub mod identity;
pub mod jwks;
pub mod keys;
pub mod metrics;
pub mod openapi;
pub mod ops;
pub mod orders;
pub mod problem;
pub mod results;
pub mod sales_cache;

use std::future::Future;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use seckill_contracts::config::{read_secret, ApiConfig, Config};
use seckill_contracts::keys::KeySchema;
use seckill_contracts::redis_client::RedisConn;
use sqlx::MySqlPool;
use tokio::net::TcpListener;
use utoipa_axum::router::OpenApiRouter;

use crate::connections::{self, ConnectError};
use crate::lock::RedisLock;
use crate::payments::{recovery, Payments};
use crate::probes;
use crate::tokens::TokenSigner;
use cpu_work::CpuWork;
use keys::ApiKeys;
use sales_cache::SingleFlight;
use seckill_contracts::jwt::JwtVerifier;

/// Largest request body accepted; every body of this api is a small JSON
/// object, so anything bigger is refused with a problem+json 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Why the api could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiSetupError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("preparing the login dummy hash: {0}")]
    DummyHash(String),
}

struct Inner {
    db: MySqlPool,
    redis: RedisConn,
    keys: KeySchema,
    config: ApiConfig,
    keys_in_force: Arc<ApiKeys>,
    admin_digest: Option<[u8; 32]>,
    dummy_hash: String,
    flights: SingleFlight,
    cpu: CpuWork,
    /// The whole config: the ops routes audit and replay with it.
    full_config: Config,
    /// The ops routes' broker connection, opened on first use.
    ops_broker: tokio::sync::Mutex<Option<Arc<lapin::Connection>>>,
    /// The payment coordinator (`POST /orders/{id}/pay`).
    payments: Arc<Payments>,
}

/// Everything a request handler needs, cheap to clone (one `Arc`).
///
/// Built once per process by [`ApiState::connect`]; tests keep a clone to
/// look inside (e.g. [`ApiState::sale_db_loads`]).
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

impl ApiState {
    /// Opens MySQL and Redis and loads the key material.
    ///
    /// Stores are required: without them nothing works, so that is an
    /// error. Key material degrades instead, with an error in the log: a
    /// missing private key makes login answer 503, missing public keys make
    /// every authenticated route answer 503 (never accept), and a missing
    /// admin token disables the admin route. This keeps `/healthz`, sales
    /// and registration serving on an instance whose key files are being
    /// rotated or deployed, without ever accepting an unverified caller.
    pub async fn connect(config: &Config) -> Result<ApiState, ApiSetupError> {
        let db = connections::mysql(&config.database).await?;
        let redis = connections::redis(config).await?;
        let api_keys = Arc::new(ApiKeys::load(config));
        keys::spawn_reload(Arc::downgrade(&api_keys), config.jwt.clone());
        let admin_digest = read_secret(
            "api.admin_token",
            config.api.admin_token.as_deref(),
            config.api.admin_token_path.as_deref(),
        )
        .inspect_err(|e| tracing::warn!(error = %e, "admin routes disabled"))
        .ok()
        .map(|t| admin::digest(&t));
        // A real argon2id hash with the same parameters as users' hashes, so
        // an unknown username costs a login as much as a wrong password.
        let dummy_hash = tokio::task::spawn_blocking(|| {
            let mut secret = [0u8; 16];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
            auth::hash_password(&hex::encode(secret))
        })
        .await
        .map_err(|e| ApiSetupError::DummyHash(e.to_string()))?
        .map_err(|e| ApiSetupError::DummyHash(e.to_string()))?;
        let keys = KeySchema::new(config.redis.key_prefix.clone());
        let payments = Arc::new(Payments::new(db.clone(), keys.clone(), config));
        let state = ApiState {
            inner: Arc::new(Inner {
                db,
                redis,
                keys,
                config: config.api.clone(),
                keys_in_force: api_keys,
                admin_digest,
                dummy_hash,
                flights: SingleFlight::default(),
                cpu: CpuWork::new(config.api.cpu_jobs),
                full_config: config.clone(),
                ops_broker: tokio::sync::Mutex::new(None),
                payments,
            }),
        };
        Ok(state)
    }

    /// The MySQL pool.
    pub fn db(&self) -> &MySqlPool {
        &self.inner.db
    }

    /// A Redis handle (a cheap clone of the shared multiplexed connection).
    pub fn redis(&self) -> RedisConn {
        self.inner.redis.clone()
    }

    /// The deployment's Redis key schema.
    pub fn keys(&self) -> &KeySchema {
        &self.inner.keys
    }

    /// The payment coordinator.
    pub fn payments(&self) -> &Payments {
        &self.inner.payments
    }

    /// The `[api]` section.
    pub fn config(&self) -> &ApiConfig {
        &self.inner.config
    }

    /// The current token signer, when a private key loaded.
    pub fn signer(&self) -> Option<Arc<TokenSigner>> {
        self.inner.keys_in_force.signer()
    }

    /// The token verifier, when the public keys loaded.
    pub fn verifier(&self) -> Option<&JwtVerifier> {
        self.inner.keys_in_force.verifier()
    }

    /// The keys in force, for tests that rotate without waiting for the
    /// background reload.
    pub fn keys_in_force(&self) -> &ApiKeys {
        &self.inner.keys_in_force
    }

    fn admin_digest(&self) -> Option<&[u8; 32]> {
        self.inner.admin_digest.as_ref()
    }

    fn dummy_hash(&self) -> &str {
        &self.inner.dummy_hash
    }

    /// The bounded runner for password hashing and captcha rendering.
    pub fn cpu(&self) -> &CpuWork {
        &self.inner.cpu
    }

    fn flights(&self) -> &SingleFlight {
        &self.inner.flights
    }

    /// MySQL reads the sale cache loader of this instance performed: lets
    /// tests prove a stampede or a cached miss did not reach MySQL.
    /// The whole config (the ops routes need the broker's and the
    /// worker's settings).
    pub fn full_config(&self) -> &Config {
        &self.inner.full_config
    }

    /// The ops routes' broker connection, connected on first use and
    /// again after [`drop_ops_broker`](Self::drop_ops_broker).
    async fn ops_broker(&self) -> Result<Arc<lapin::Connection>, lapin::Error> {
        let mut slot = self.inner.ops_broker.lock().await;
        if let Some(conn) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(conn.clone());
        }
        let conn = Arc::new(
            seckill_contracts::brokers::connect(
                &self.inner.full_config.amqp,
                lapin::ConnectionProperties::default(),
            )
            .await?
            .0,
        );
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn drop_ops_broker(&self) {
        self.inner.ops_broker.lock().await.take();
    }

    pub fn sale_db_loads(&self) -> u64 {
        self.inner.flights.db_loads()
    }
}

/// Every public route, each registered with its OpenAPI description
/// (`utoipa_axum::routes!`): the document lists exactly these. Routes that
/// are not part of the public API (admin, probes) are added in [`router`].
pub fn public_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(openapi::skeleton())
        .merge(auth::router())
        .merge(sales_cache::router())
        .merge(captcha::router())
        .merge(hidden_path::router())
        .merge(results::router())
        .merge(idempotency::router())
        .merge(jwks::router())
        .merge(orders::router())
        .merge(openapi::router())
}

/// The whole router, with metrics, request ids and problem+json fallbacks.
pub fn router(state: ApiState) -> Router {
    let (public, _) = public_routes().split_for_parts();
    service_frame(public.merge(admin::router()).merge(ops::router())).with_state(state)
}

/// What every HTTP service of this crate (the api, the wallet) puts around
/// its routes: the probes, problem+json for unknown routes and methods, the
/// body limit, request ids and metrics.
pub fn service_frame<S: Clone + Send + Sync + 'static>(routes: Router<S>) -> Router<S> {
    routes
        .merge(probes::router())
        .fallback(problem::route_not_found)
        .method_not_allowed_fallback(problem::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(metrics::track))
}

/// Serves the api on `listener` until `shutdown` resolves, then drains
/// in-flight requests.
pub async fn serve(
    state: ApiState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Message mode: the debited-message consumer and the refund relay,
    // for as long as this api serves.
    let _messaging = state.inner.payments.start_messaging(state.full_config());
    recovery::spawn(
        state.inner.payments.clone(),
        RedisLock::new(
            state.redis(),
            state.keys(),
            recovery::LOCK_NAME,
            std::time::Duration::from_millis(state.full_config().payment.transaction_timeout_ms),
        ),
    );
    if let Ok(addr) = listener.local_addr() {
        crate::fleet_report::spawn_api(
            state.redis(),
            state.keys().clone(),
            state.db().clone(),
            addr.port(),
        );
    }
    let app = router(state);
    tracing::info!(addr = ?listener.local_addr().ok(), "api listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    /// The document lists the routes of [`super::public_routes`] by
    /// construction, but a route added with axum's `.route(..)` would be
    /// served and not documented. Only the non-public routers (admin,
    /// ops, probes) may do that, and never under the public prefixes.
    #[test]
    fn every_public_route_is_registered_with_its_description() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![dir.join("probes.rs")];
        for entry in std::fs::read_dir(dir.join("api")).unwrap() {
            files.push(entry.unwrap().path());
        }
        for file in files {
            let source = std::fs::read_to_string(&file).unwrap();
            let name = file.file_name().unwrap().to_string_lossy().into_owned();
            for (i, line) in source.lines().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                let Some(at) = line.find(".route(\"") else {
                    continue;
                };
                let rest = &line[at..];
                let public = rest.contains("\"/api/") || rest.contains("\"/.well-known/");
                let allowed = matches!(name.as_str(), "admin.rs" | "ops.rs" | "probes.rs");
                assert!(
                    allowed && !public,
                    "{name}:{}: `.route(` outside utoipa_axum::routes!: {line}",
                    i + 1
                );
            }
        }
    }
}
