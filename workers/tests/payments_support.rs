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

/// A fault-at-every-step run: each case cuts one payment at `point` and
/// says how its order must end (`paid` if the cut came after the
/// decision); the abort-path cases are paid by buyers who cannot afford
/// the order, so they always end unpaid.
pub struct FaultRun<'a> {
    pub commit_path: &'a [(&'a str, &'a str)],
    pub abort_path: &'a [&'a str],
    /// The mode's fail points: every one must be among the cases.
    pub fail_points: &'a [&'a str],
    /// How long the fault stays on after the call, so the asynchronous
    /// half (relay, consumer) meets it too.
    pub fault_lingers: Duration,
    /// Whether one recovery pass must end everything (no connection
    /// left to close, no branch held elsewhere).
    pub one_pass: bool,
}

impl FaultRun<'_> {
    /// Runs every case on `c`; after each: the api restarts (a fresh
    /// coordinator), recovery runs, the order ends as expected, no money
    /// stays frozen, the buyer paid exactly when the order is paid, and
    /// both audits are clean.
    pub async fn run(&self, c: &Ctx) {
        let users: Vec<u64> =
            (1..=(self.commit_path.len() + self.abort_path.len()) as u64).collect();
        let ids = c.orders(&users).await;
        let (rich, poor) = users.split_at(self.commit_path.len());
        c.wallet.credit(rich, 10_000).await;
        c.wallet.credit(poor, PRICE / 2).await;
        let cases = self
            .commit_path
            .iter()
            .zip(rich)
            .map(|((point, end), u)| (*point, *end, *u))
            .chain(
                self.abort_path
                    .iter()
                    .zip(poor)
                    .map(|(point, u)| (*point, "unpaid", *u)),
            );
        let mut covered = HashSet::new();
        for (point, expected, user) in cases {
            let order = &ids[(user - 1) as usize];
            fail::cfg(point, "return").unwrap();
            let cut = c.payments.pay(&mut c.redis.clone(), user, order).await;
            tokio::time::sleep(self.fault_lingers).await;
            fail::remove(point);
            covered.insert(point);
            // The call died (an error) or, for the wallet's own points,
            // was answered as a wallet that did not answer. It may still
            // answer `Paid` once the order is paid (the decision is
            // logged, recovery finishes the wallet), never otherwise.
            let reported_paid = matches!(cut, Ok(PayResult::Paid(_)));
            assert!(
                !reported_paid || expected == "paid",
                "{point}: a payment cut short reported paid: {cut:?}"
            );
            let restarted = payments_for(c.config(), &c.db);
            if self.one_pass {
                let report = recover_once(&restarted, Duration::ZERO)
                    .await
                    .expect("recovery");
                assert_eq!(report.left_open, 0, "{point}: {report:?}");
            } else {
                recover_all(&restarted).await;
            }
            assert_eq!(c.wait_status(order, expected).await, expected, "{point}");
            let start = if poor.contains(&user) {
                PRICE / 2
            } else {
                10_000
            };
            let spent = if expected == "paid" { PRICE } else { 0 };
            assert_eq!(c.balance(user).await, (start - spent, 0), "{point}");
            c.assert_audits_clean().await;
        }
        let missing: Vec<_> = self
            .fail_points
            .iter()
            .filter(|p| !covered.contains(*p))
            .collect();
        assert!(
            missing.is_empty(),
            "fail points never exercised: {missing:?}"
        );
    }
}

/// Buyers `1..=n` (topped up) pay their orders one after another, 10 a
/// second, while the wallet is down from 0.5 s to 5.5 s: stopped, its
/// connections and any branch it held going with it, then restarted on
/// the same address. Returns the context (with the restarted wallet), the
/// answers in buyer order, and the order ids.
pub async fn pay_through_a_wallet_outage(c: Ctx, n: u64) -> (Ctx, Vec<PayResult>, Vec<String>) {
    let users: Vec<u64> = (1..=n).collect();
    let ids = c.orders(&users).await;
    c.wallet.credit(&users, 10_000).await;
    let config = c.config().clone();
    let url = c.wallet.url.clone();
    let Ctx {
        env,
        db,
        wallet,
        payments,
        redis,
        sale,
        messaging,
    } = c;
    let payer = {
        let (payments, redis, ids) = (payments.clone(), redis.clone(), ids.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for (i, id) in ids.iter().enumerate() {
                let r = payments
                    .pay(&mut redis.clone(), i as u64 + 1, id)
                    .await
                    .expect("pay");
                answers.push(r);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answers
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    wallet.stop().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let wallet = InProcessWallet::restart(&config, &url).await;
    let answers = payer.await.expect("the payer");
    let c = Ctx {
        env,
        db,
        wallet,
        payments,
        redis,
        sale,
        messaging,
    };
    (c, answers, ids)
}

/// A buyer pays one order with two requests at once, five times over:
/// at most one of each pair is accepted (paid or settling), the order
/// ends paid, and the buyer is charged once.
pub async fn pay_twice_at_once(c: &Ctx) {
    c.wallet.credit(&[1], 10_000).await;
    let ids = c.orders(&[1]).await;
    for _ in 0..5 {
        let (a, b) = tokio::join!(c.pay(1, &ids[0]), c.pay(1, &ids[0]));
        let accepted = [&a, &b]
            .iter()
            .filter(|r| matches!(r, PayResult::Paid(_) | PayResult::Settling(_)))
            .count();
        assert!(accepted <= 1, "{a:?} {b:?}");
    }
    assert_eq!(c.wait_status(&ids[0], "paid").await, "paid");
    assert_eq!(c.balance(1).await, (10_000 - PRICE, 0));
    c.assert_audits_clean().await;
}

/// Buyers `1..=n` pay at once (every tenth cannot afford it): each gets
/// its own answer, the wallet saw far fewer calls of `route` (its batch
/// route for the mode's first wallet call) than payments, and both audits
/// are clean once every payment settled.
pub async fn pay_at_once_in_batches(c: &Ctx, n: u64, route: &str) {
    let users: Vec<u64> = (1..=n).collect();
    let ids = c.orders(&users).await;
    let (poor, rich): (Vec<u64>, Vec<u64>) = users.iter().partition(|u| u.is_multiple_of(10));
    c.wallet.credit(&rich, 10_000).await;
    c.wallet.credit(&poor, PRICE - 1).await;
    let calls_before = wallet_calls(route);
    let answers =
        futures::future::join_all(users.iter().map(|&u| c.pay(u, &ids[(u - 1) as usize]))).await;
    let calls = wallet_calls(route) - calls_before;
    for (i, answer) in answers.iter().enumerate() {
        let user = users[i];
        let poor = user.is_multiple_of(10);
        match answer {
            PayResult::InsufficientFunds if poor => {}
            PayResult::Paid(_) | PayResult::Settling(_) if !poor => {}
            other => panic!("buyer {user}: {other:?}"),
        }
        let expected = if poor { "unpaid" } else { "paid" };
        assert_eq!(
            c.wait_status(&ids[i], expected).await,
            expected,
            "buyer {user}"
        );
        let spent = if poor { 0 } else { PRICE };
        let start = if poor { PRICE - 1 } else { 10_000 };
        assert_eq!(c.balance(user).await, (start - spent, 0), "buyer {user}");
    }
    assert!(
        calls > 0 && calls * 2 < n,
        "{calls} calls of {route} for {n} payments"
    );
    c.assert_audits_clean().await;
    println!("{n} payments at once: {calls} calls of {route}");
}

/// Requests the wallets of this process answered on `route`.
fn wallet_calls(route: &str) -> u64 {
    prometheus::gather()
        .iter()
        .filter(|f| f.name() == "seckill_api_requests_total")
        .flat_map(|f| f.get_metric())
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == "route" && l.value() == route)
        })
        .map(|m| m.get_counter().value() as u64)
        .sum()
}

/// At most this many statements for a set procedure's group of up to
/// eight plain items (each of its statements once, whatever the group's
/// size); item by item a group of eight takes over forty.
pub const SET_STATEMENTS: i64 = 24;

/// Calls `procedure` (its arguments written in, the first `?` the items)
/// on one connection; its outcomes and the statements this connection
/// ran for it, its procedures' included.
pub async fn counted(
    db: &sqlx::MySqlPool,
    procedure: &str,
    items: &serde_json::Value,
) -> (Vec<String>, i64) {
    let mut conn = db.acquire().await.unwrap();
    let before = statements_run(&mut conn).await;
    let answer: String = sqlx::query_scalar(&format!("CALL {procedure}"))
        .bind(items.to_string())
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    // Less the counting query itself.
    let statements = statements_run(&mut conn).await - before - 1;
    (serde_json::from_str(&answer).unwrap(), statements)
}

/// Statements this connection ran, by kind, summed (MariaDB's `Queries`
/// is the whole server's, whatever the scope asked: other tests' too).
async fn statements_run(conn: &mut sqlx::MySqlConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT CAST(SUM(VARIABLE_VALUE) AS SIGNED) FROM information_schema.SESSION_STATUS \
         WHERE VARIABLE_NAME LIKE 'COM\\_%'",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

/// One of this connection's status counters.
pub async fn session_status(conn: &mut sqlx::MySqlConnection, name: &str) -> i64 {
    let (_, n): (String, String) = sqlx::query_as(&format!("SHOW SESSION STATUS LIKE '{name}'"))
        .fetch_one(conn)
        .await
        .unwrap();
    n.parse().unwrap()
}
