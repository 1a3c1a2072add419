//! What the payment tests share: a sale with orders admitted as the
//! gateway and the worker would, the wallet service in-process, a
//! coordinator in the mode under test, recovery run to the end, and both
//! audits (payments: SPEC invariant 7; the sale: 1, 2 and 4). Included by
//! the `payments_*.rs` test files with `#[path]`; as a test target of its
//! own it has no tests.

#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use seckill_contracts::config::{Config, PaymentMode};
use seckill_contracts::testkit::TestEnv;
use seckill_workers::payments::recovery::{recover_once, RecoveryReport};
use seckill_workers::payments::wallet_client::WalletClient;
use seckill_workers::payments::{audit as payments_audit, PayResult, Payments};
use seckill_workers::wallet::accounts;
use seckill_workers::worker::order_writer::{self, Settlement, WriterConfig};
use seckill_workers::{audit, connections};
use sqlx::MySqlPool;

#[path = "worker_support.rs"]
pub mod support;

use support::{create_sale, message, InProcessWallet};

/// The sale price every order of these tests costs (support::create_sale).
pub const PRICE: i64 = 990;

pub struct Ctx {
    pub env: TestEnv,
    pub db: MySqlPool,
    pub wallet: InProcessWallet,
    pub payments: Arc<Payments>,
    pub redis: seckill_contracts::redis_client::RedisConn,
    pub sale: u64,
    /// The api's side of the message mode (consumer, refund relay).
    pub messaging: seckill_workers::outbox::Running,
}

impl Ctx {
    /// A sale of `stock`, a wallet, and a coordinator paying in `mode`.
    pub async fn start(stock: u32, mode: PaymentMode) -> Ctx {
        let env = TestEnv::new().await;
        let db = env.db().await;
        let mut config = env.config.clone();
        config.payment.mode = mode;
        // Short enough that a test sees a held branch let go.
        config.wallet.xa_hold_ms = 1_000;
        let wallet = InProcessWallet::start(&config).await;
        let payments = Arc::new(payments_for(&wallet.config, &db));
        let messaging = payments.start_messaging(&wallet.config);
        let redis = connections::redis(&env.config).await.expect("redis");
        let sale = create_sale(&env, &db, stock).await.id;
        Ctx {
            env,
            db,
            wallet,
            payments,
            redis,
            sale,
            messaging,
        }
    }

    pub fn config(&self) -> &Config {
        &self.wallet.config
    }

    /// Orders for `users`, admitted as the gateway and the worker would.
    pub async fn orders(&self, users: &[u64]) -> Vec<String> {
        let keys = self.env.keys().sale(self.sale);
        let mut redis = self.env.redis().await;
        let _: i64 = redis.decr(keys.stock(), users.len() as i64).await.unwrap();
        let _: i64 = redis.sadd(keys.buyers(), users).await.unwrap();
        let messages: Vec<_> = users
            .iter()
            .map(|u| message(uuid::Uuid::now_v7().to_string(), self.sale, *u))
            .collect();
        let written = order_writer::write_batch(
            &self.db,
            &messages,
            &HashSet::new(),
            WriterConfig {
                order_timeout_secs: 1800,
            },
        )
        .await
        .expect("write orders");
        written
            .into_iter()
            .map(|o| match o.settlement {
                Settlement::Success { order_id } => order_id,
                other => panic!("admission failed: {other:?}"),
            })
            .collect()
    }

    pub async fn pay(&self, user: u64, order: &str) -> PayResult {
        self.payments
            .pay(&mut self.redis.clone(), user, order)
            .await
            .expect("pay")
    }

    pub async fn balance(&self, user: u64) -> (i64, i64) {
        let w = accounts::statement(&self.wallet.db, user).await.unwrap();
        (w.balance_cents, w.frozen_cents)
    }

    /// Waits (up to 10 s) for `order` to reach `status`; the status it
    /// ended with.
    pub async fn wait_status(&self, order: &str, status: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.status(order).await;
            if now == status || tokio::time::Instant::now() >= deadline {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn status(&self, order: &str) -> String {
        sqlx::query_scalar("SELECT CAST(status AS CHAR) FROM orders WHERE id = ?")
            .bind(order)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    /// Both audits clean: payments (invariant 7) and the sale (1, 2, 4).
    pub async fn assert_audits_clean(&self) {
        let client = WalletClient::new(self.config());
        let report = payments_audit::run(&self.db, &client, Duration::from_secs(10))
            .await
            .expect("payments audit");
        assert!(report.ok, "{report:#?}");
        self.assert_sale_audit_clean().await;
    }

    pub async fn assert_sale_audit_clean(&self) {
        let mut redis = self.env.redis().await;
        let sale = audit::run(
            &self.env.config,
            &self.db,
            &mut redis,
            self.sale,
            Duration::from_secs(1),
        )
        .await
        .expect("sale audit");
        assert!(sale.ok, "{sale:?}");
    }

    pub async fn finish(self) {
        self.wallet.stop().await;
        self.env.cleanup().await;
    }
}

pub fn payments_for(config: &Config, db: &MySqlPool) -> Payments {
    Payments::new(
        db.clone(),
        seckill_contracts::keys::KeySchema::new(config.redis.key_prefix.clone()),
        config,
    )
}

/// Runs recovery passes (every transaction, whatever its age) until none
/// leaves anything open: a branch whose connection is still closing, or
/// one a wallet instance still holds, is reached on a later pass.
pub async fn recover_all(payments: &Payments) -> RecoveryReport {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut total = RecoveryReport::default();
    loop {
        let pass = recover_once(payments, Duration::ZERO)
            .await
            .expect("recovery");
        total.committed += pass.committed;
        total.aborted += pass.aborted;
        total.orphans_ended += pass.orphans_ended;
        if pass.left_open == 0 {
            return total;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "recovery still leaves transactions open after 10 s: {pass:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many orders of the test's database have `status`.
pub async fn count_status(db: &MySqlPool, status: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM orders WHERE status = ?")
        .bind(status)
        .fetch_one(db)
        .await
        .expect("count orders")
}
