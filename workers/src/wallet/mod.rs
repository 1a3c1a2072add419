//! The wallet service (`seckill-wallet`): buyers' money, in a database of
//! its own (`wallet.database_url`, `seckill_wallet`) that no other process
//! opens. The api pays orders through its internal routes; buyers read
//! their wallet through the gateway; ops top wallets up.
//!
//! | module | what |
//! |---|---|
//! | [`accounts`] | balances and the ledger: every movement one guarded update plus one ledger row |
//! | [`tcc`] | the wallet's TCC branch (freeze, debit, unfreeze) behind its fence |
//! | [`xa`] | the wallet's XA branch (a prepared debit) and the prepared branches this instance holds |
//! | [`message`] | the message mode: a debit with its outbox message, the check-back, refunds |
//! | [`routes`] | the HTTP surface: public, admin and internal routes |
//!
//! Any number of instances serve one database: every operation is one
//! local transaction (or one XA branch), and the fences (and XA branch
//! names) make every branch call idempotent.

pub mod accounts;
pub mod message;
pub mod routes;
pub mod tcc;
pub mod xa;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use seckill_contracts::config::{read_secret, Config, DatabaseConfig};
use seckill_contracts::jwt::JwtVerifier;
use sqlx::MySqlPool;
use tokio::net::TcpListener;

use crate::api::admin::digest;
use crate::api::identity::VerifiesTokens;
use crate::api::keys::ApiKeys;
use crate::api::service_frame;
use crate::connections::{self, ConnectError};

/// The wallet database's migrations (`migrations/wallet/`), embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/wallet");

/// The wallet database as a [`DatabaseConfig`], so it is opened (pool
/// size, idle-transaction timeout) exactly as the order database is.
pub fn database(config: &Config) -> DatabaseConfig {
    DatabaseConfig {
        url: config.wallet.database_url.clone(),
        max_connections: config.wallet.max_connections,
        ..config.database.clone()
    }
}

/// Creates the wallet database if needed and applies its migrations.
pub async fn migrate(config: &Config) -> Result<(), ConnectError> {
    connections::migrate_with(&database(config), &MIGRATOR).await
}

struct Inner {
    db: MySqlPool,
    /// The TCC branch's steps, run in groups.
    tcc: tcc::WalletSteps,
    /// The message mode's debits, run in groups.
    debits: message::Debits,
    xa: Arc<xa::PreparedBranches>,
    /// The most payments one internal call carries (the coordinators'
    /// `payment.group_commit_max`).
    batch_max: usize,
    /// Wakes this instance's outbox relay (`message` mode).
    relay_wake: Arc<tokio::sync::Notify>,
    /// The relay and the refund consumer (`message` mode) run while this
    /// state lives.
    _messaging: crate::outbox::Running,
    keys: Arc<ApiKeys>,
    admin_digest: Option<[u8; 32]>,
    service_digest: Option<[u8; 32]>,
}

/// What every wallet handler needs, cheap to clone.
#[derive(Clone)]
pub struct WalletState {
    inner: Arc<Inner>,
}

impl WalletState {
    /// Opens the wallet database and loads the verifying keys and the
    /// tokens. A missing secret disables the routes it guards (503), as in
    /// the api; a missing database is an error.
    pub async fn connect(config: &Config) -> Result<WalletState, ConnectError> {
        let db = connections::mysql(&database(config)).await?;
        let keys = Arc::new(ApiKeys::load(config));
        crate::api::keys::spawn_reload(Arc::downgrade(&keys), config.jwt.clone());
        let secret = |key: &str, value: Option<&str>, path: Option<&std::path::Path>| {
            read_secret(key, value, path)
                .inspect_err(|e| tracing::warn!(error = %e, "{key}: routes disabled"))
                .ok()
                .map(|t| digest(&t))
        };
        let admin_digest = secret(
            "api.admin_token",
            config.api.admin_token.as_deref(),
            config.api.admin_token_path.as_deref(),
        );
        let service_digest = secret(
            "payment.service_token",
            config.payment.service_token.as_deref(),
            config.payment.service_token_path.as_deref(),
        );
        let relay_wake = Arc::new(tokio::sync::Notify::new());
        let messaging = start_messaging(config, &db, &relay_wake);
        let groups = crate::group_commit::GroupLimits::from_config(&config.payment);
        Ok(WalletState {
            inner: Arc::new(Inner {
                relay_wake,
                _messaging: messaging,
                tcc: tcc::WalletSteps::start(&db, groups),
                debits: message::Debits::start(&db, groups),
                db,
                xa: xa::PreparedBranches::new(std::time::Duration::from_millis(
                    config.wallet.xa_hold_ms,
                )),
                batch_max: groups.max_items,
                keys,
                admin_digest,
                service_digest,
            }),
        })
    }

    pub fn db(&self) -> &MySqlPool {
        &self.inner.db
    }

    /// The TCC branch's steps (grouped with other payments').
    pub fn tcc(&self) -> &tcc::WalletSteps {
        &self.inner.tcc
    }

    /// The message mode's debits (grouped with other payments').
    pub fn debits(&self) -> &message::Debits {
        &self.inner.debits
    }

    pub(crate) fn wake_relay(&self) {
        self.inner.relay_wake.notify_one();
    }

    /// The prepared XA branches this instance holds the connection of.
    /// The most payments one internal call carries.
    pub fn batch_max(&self) -> usize {
        self.inner.batch_max
    }

    pub fn xa(&self) -> &xa::PreparedBranches {
        &self.inner.xa
    }

    fn admin_digest(&self) -> Option<&[u8; 32]> {
        self.inner.admin_digest.as_ref()
    }

    fn service_digest(&self) -> Option<&[u8; 32]> {
        self.inner.service_digest.as_ref()
    }
}

impl VerifiesTokens for WalletState {
    fn token_verifier(&self) -> Option<&JwtVerifier> {
        self.inner.keys.verifier()
    }
}

/// `message` mode: the relay of this database's outbox into the payment
/// queue, and the consumer of the api's refunds. (Nothing in other modes.)
fn start_messaging(
    config: &Config,
    db: &MySqlPool,
    wake: &Arc<tokio::sync::Notify>,
) -> crate::outbox::Running {
    let running = crate::outbox::Running::new();
    if config.payment.mode != seckill_contracts::config::PaymentMode::Message {
        return running;
    }
    crate::outbox::spawn_relay(
        config,
        db.clone(),
        config.amqp.payment_queue.clone(),
        wake.clone(),
        running.stopped(),
    );
    let refunds = db.clone();
    crate::outbox::spawn_consumer(
        config,
        config.amqp.refund_queue.clone(),
        crate::outbox::ACTING_AT_ONCE,
        move |body| {
            let db = refunds.clone();
            async move { message::on_refund(&db, &body).await }
        },
        running.stopped(),
    );
    running
}

/// The whole router: public, admin and internal routes, probes, metrics
/// and problem+json fallbacks.
pub fn router(state: WalletState) -> Router {
    let (public, _) = routes::public_routes().split_for_parts();
    service_frame(public.merge(routes::private_routes())).with_state(state)
}

/// Serves the wallet on `listener` until `shutdown` resolves.
pub async fn serve(
    state: WalletState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tracing::info!(addr = ?listener.local_addr().ok(), "wallet listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
