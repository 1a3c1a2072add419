//! The order lifecycle against the real MariaDB, Redis and RabbitMQ: the
//! orders routes of the api (served in-process), pay with idempotency keys,
//! cancel, the timeout close by delayed message and by the sweeper, and pay
//! racing the timeout close. Each test has its own database, key prefix and
//! queues (`TestEnv`).

#[path = "worker_support.rs"]
mod support;

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rand::Rng;
use redis::AsyncCommands;
use reqwest::StatusCode;
use seckill_contracts::config::{Config, PaymentMode, PublicKeyConfig};
use seckill_contracts::testkit::{TestEnv, TestKeys};
use seckill_workers::api::{self, ApiState};
use seckill_workers::orders::{self, CloseOutcome};
use seckill_workers::payments::{PayResult, Payments};
use seckill_workers::worker::order_writer::{self, Settlement, WriterConfig};
use seckill_workers::worker::{sweeper, WorkerContext};
use seckill_workers::{audit, connections};
use serde_json::Value;
use sqlx::MySqlPool;
use support::{
    count, create_sale, message, stock_left, wait_for, InProcessWallet, InProcessWorker,
};

fn test_keys() -> &'static TestKeys {
    static KEYS: OnceLock<TestKeys> = OnceLock::new();
    KEYS.get_or_init(|| TestKeys::generate("orders-test-1"))
}

/// Admits `users` to `sale` the way the gateway and the worker would, minus
/// the HTTP: Redis stock down and buyer marked, then the worker's batch
/// write. Returns the order ids in user order.
async fn admit(
    env: &TestEnv,
    db: &MySqlPool,
    sale: u64,
    users: &[u64],
    timeout_secs: u64,
) -> Vec<String> {
    let keys = env.keys().sale(sale);
    let mut redis = env.redis().await;
    let _: i64 = redis
        .decr(keys.stock(), users.len() as i64)
        .await
        .expect("decrement stock");
    let _: i64 = redis.sadd(keys.buyers(), users).await.expect("buyers");
    let messages: Vec<_> = users
        .iter()
        .map(|u| message(uuid::Uuid::now_v7().to_string(), sale, *u))
        .collect();
    let outcomes = order_writer::write_batch(
        db,
        &messages,
        &HashSet::new(),
        WriterConfig {
            order_timeout_secs: timeout_secs,
        },
    )
    .await
    .expect("write orders");
    outcomes
        .into_iter()
        .map(|o| match o.settlement {
            Settlement::Success { order_id } => order_id,
            other => panic!("admission failed: {other:?}"),
        })
        .collect()
}

async fn redis_stock(env: &TestEnv, sale: u64) -> i64 {
    let mut redis = env.redis().await;
    redis
        .get(env.keys().sale(sale).stock())
        .await
        .expect("stock")
}

async fn order_status(db: &MySqlPool, id: &str) -> (String, Option<String>) {
    sqlx::query_as(
        "SELECT CAST(status AS CHAR), CAST(close_reason AS CHAR) FROM orders WHERE id = ?",
    )
    .bind(id)
    .fetch_one(db)
    .await
    .expect("order row")
}

struct Api {
    env: TestEnv,
    wallet: InProcessWallet,
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Api {
    async fn start() -> Api {
        let env = TestEnv::new().await;
        let dir = tempfile::tempdir().unwrap();
        let keys = test_keys();
        let public = keys.write_public(dir.path());
        let mut config = env.config.clone();
        config.jwt.signing_kid = keys.kid.clone();
        config.jwt.public_keys = vec![PublicKeyConfig {
            kid: keys.kid.clone(),
            path: public,
        }];
        let wallet = InProcessWallet::start(&config).await;
        let config = wallet.config.clone();
        let state = ApiState::connect(&config).await.expect("api state");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(api::serve(state, listener, async {
            let _ = rx.await;
        }));
        Api {
            env,
            wallet,
            base,
            http: reqwest::Client::new(),
            _dir: dir,
            stop: Some(tx),
        }
    }

    fn token(&self, user: u64) -> String {
        let c = &self.env.config.jwt;
        test_keys().mint(&TestKeys::claims_for(user, &c.issuer, &c.audience, 600))
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        user: Option<u64>,
        idem: Option<&str>,
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(u) = user {
            req = req.bearer_auth(self.token(u));
        }
        if let Some(k) = idem {
            req = req.header("Idempotency-Key", k);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        (status, body, headers)
    }

    /// `POST /api/v1/orders/{order}/pay` as `user`, with `key` as the
    /// `Idempotency-Key` when given.
    async fn pay(
        &self,
        order: &str,
        user: u64,
        key: Option<&str>,
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let path = format!("/api/v1/orders/{order}/pay");
        self.call(reqwest::Method::POST, &path, Some(user), key)
            .await
    }

    /// `POST /api/v1/orders/{order}/cancel` as `user`.
    async fn cancel(
        &self,
        order: &str,
        user: u64,
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let path = format!("/api/v1/orders/{order}/cancel");
        self.call(reqwest::Method::POST, &path, Some(user), None)
            .await
    }

    async fn key(&self, user: u64) -> String {
        let (s, body, _) = self
            .call(
                reqwest::Method::GET,
                "/api/v1/idempotency-key",
                Some(user),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        body["key"].as_str().expect("key").to_string()
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.wallet.stop().await;
        self.env.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_routes_pay_and_cancel_keep_buyers_apart_and_stock_right() {
    use reqwest::Method;
    let api = Api::start().await;
    let db = api.env.db().await;
    let sale = create_sale(&api.env, &db, 5).await;
    let ids = admit(&api.env, &db, sale.id, &[11, 12], 1800).await;
    let (mine, theirs) = (&ids[0], &ids[1]);

    // Listing and reading: own orders only; others' and bogus ids are 404.
    let (s, body, _) = api
        .call(Method::GET, "/api/v1/orders", Some(11), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let list = body.as_array().expect("array");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], mine.as_str());
    assert_eq!(list[0]["status"], "unpaid");
    assert_eq!(list[0]["amount_cents"], 990);
    let (s, _, h) = api.call(Method::GET, "/api/v1/orders", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(h.contains_key("www-authenticate"));
    let (s, body, _) = api
        .call(
            Method::GET,
            &format!("/api/v1/orders/{mine}"),
            Some(11),
            None,
        )
        .await;
    assert_eq!(
        (s, body["sale_id"].as_u64()),
        (StatusCode::OK, Some(sale.id))
    );
    for path in [
        format!("/api/v1/orders/{theirs}"),
        "/api/v1/orders/1%20OR%201=1".to_string(),
        "/api/v1/orders/00000000-0000-7000-8000-000000000000".to_string(),
    ] {
        let (s, body, h) = api.call(Method::GET, &path, Some(11), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}: {body}");
        assert_eq!(h["content-type"], "application/problem+json");
    }
    // Another user cannot pay or cancel my order.
    let key12 = api.key(12).await;
    let (s, _, _) = api.pay(mine, 12, Some(&key12)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = api.cancel(mine, 12).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(order_status(&db, mine).await.0, "unpaid");

    // Pay needs an issued key of this user.
    let (s, _, _) = api.pay(mine, 11, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _, _) = api
        .pay(mine, 11, Some("0123456789abcdef0123456789abcdef"))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "a never-issued key");
    let (s, _, _) = api.pay(mine, 11, Some(&key12)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "another user's key");
    let (s, _, _) = api.pay(mine, 11, Some("'; DROP TABLE orders; --")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(order_status(&db, mine).await.0, "unpaid");

    // No money in the wallet: 402, nothing charged, the order stays unpaid.
    let poor = api.key(11).await;
    let (s, body, _) = api.pay(mine, 11, Some(&poor)).await;
    assert_eq!(s, StatusCode::PAYMENT_REQUIRED, "{body}");
    assert_eq!(body["type"], "/problems/insufficient-funds");
    assert_eq!(order_status(&db, mine).await.0, "unpaid");
    api.wallet.credit(&[11], 10_000).await;

    let key = api.key(11).await;
    let (s, first, h) = api.pay(mine, 11, Some(&key)).await;
    assert_eq!(s, StatusCode::OK, "{first}");
    assert_eq!(first["status"], "paid");
    assert!(first["paid_at"].is_string());
    assert!(!h.contains_key("idempotent-replayed"));
    let (s, again, h) = api.pay(mine, 11, Some(&key)).await;
    assert_eq!(
        (s, &again),
        (StatusCode::OK, &first),
        "a replay answers the first response"
    );
    assert_eq!(h["idempotent-replayed"], "true");
    let (s, _, _) = api.pay(theirs, 12, Some(&key)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "my key is not user 12's");
    let (s, body, _) = api.cancel(mine, 11).await;
    assert_eq!(
        s,
        StatusCode::CONFLICT,
        "paid orders cannot be cancelled: {body}"
    );
    assert_eq!(order_status(&db, mine).await.0, "paid");

    // Cancel returns the unit to MySQL and Redis, once.
    let before = (
        stock_left(&db, sale.id).await,
        redis_stock(&api.env, sale.id).await,
    );
    assert_eq!(before, (3, 3));
    let (s, body, _) = api.cancel(theirs, 12).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        (body["status"].as_str(), body["close_reason"].as_str()),
        (Some("closed"), Some("cancelled"))
    );
    let (s, _, _) = api.cancel(theirs, 12).await;
    assert_eq!(s, StatusCode::OK, "cancelling twice is harmless");
    assert_eq!(stock_left(&db, sale.id).await, 4);
    assert_eq!(redis_stock(&api.env, sale.id).await, 4);
    // key12 answered 404 for my order: it stays bound to that answer.
    let (s, _, _) = api.pay(theirs, 12, Some(&key12)).await;
    assert_eq!(
        s,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a key serves one order"
    );
    let key12 = api.key(12).await;
    let (s, body, _) = api.pay(theirs, 12, Some(&key12)).await;
    assert_eq!(
        s,
        StatusCode::CONFLICT,
        "a closed order cannot be paid: {body}"
    );
    assert_eq!(body["type"], "/problems/order-closed");
    let (s, replay, _) = api.pay(theirs, 12, Some(&key12)).await;
    assert_eq!(
        (s, replay),
        (StatusCode::CONFLICT, body),
        "the 409 replays too"
    );
    // The closed order keeps its buyer (one order per buyer and sale).
    let mut redis = api.env.redis().await;
    let marked: bool = redis
        .sismember(api.env.keys().sale(sale.id).buyers(), 12)
        .await
        .unwrap();
    assert!(marked);

    assert_audit_clean(&api.env, &db, sale.id).await;
    api.stop().await;
}

fn short_timeouts(env: &TestEnv, order_timeout: u64, sweep: u64) -> Config {
    let mut config = env.config.clone();
    config.worker.order_timeout_secs = order_timeout;
    config.worker.sweep_interval_secs = sweep;
    config.worker.listen = "127.0.0.1:0".parse().unwrap();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaid_order_closes_by_its_delayed_message_and_reopens_the_sale() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    // The sweeper must not be the one closing it here.
    let config = short_timeouts(&env, 2, 3600);
    let worker = InProcessWorker::start(&config).await;
    let sale = create_sale(&env, &db, 1).await;
    let keys = env.keys().sale(sale.id);
    let client = redis::Client::open(env.config.redis.url.as_str()).unwrap();
    let mut events = client.get_async_pubsub().await.expect("pubsub");
    events
        .subscribe(env.keys().sale_events_channel())
        .await
        .expect("subscribe");
    let mut redis = env.redis().await;
    let _: i64 = redis.decr(keys.stock(), 1).await.unwrap();
    let _: i64 = redis.sadd(keys.buyers(), 7).await.unwrap();
    support::publish(&config, &[message("close-me-1", sale.id, 7)]).await;
    assert!(
        wait_for(Duration::from_secs(10), || async {
            count(&db, "SELECT COUNT(*) FROM orders").await == 1
        })
        .await,
        "the order was written"
    );
    assert_eq!(stock_left(&db, sale.id).await, 0);
    assert!(
        wait_for(Duration::from_secs(15), || async {
            count(&db, "SELECT COUNT(*) FROM orders WHERE status = 'closed' AND close_reason = 'timeout' AND stock_returned_at IS NOT NULL").await == 1
        })
        .await,
        "the delayed close message closed the order"
    );
    assert_eq!(stock_left(&db, sale.id).await, 1);
    assert_eq!(redis_stock(&env, sale.id).await, 1);
    // Gateways were told the sale has stock again.
    let mut stream = events.on_message();
    let reopened = tokio::time::timeout(Duration::from_secs(5), async {
        use futures::StreamExt;
        while let Some(m) = stream.next().await {
            let payload: String = m.get_payload().unwrap_or_default();
            if payload.contains("reopened") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(reopened, "a reopened event was published");
    drop(stream);
    worker.stop().await;
    assert_audit_clean(&env, &db, sale.id).await;
    env.cleanup().await;
}

/// SPEC invariants 1, 2 and 4 hold for `sale` once it is quiet.
async fn assert_audit_clean(env: &TestEnv, db: &MySqlPool, sale: u64) {
    let mut redis = env.redis().await;
    let report = audit::run(&env.config, db, &mut redis, sale, Duration::from_secs(1))
        .await
        .expect("audit");
    assert!(report.ok, "{report:?}");
}

async fn context(config: &Config) -> WorkerContext {
    let db = connections::mysql(&config.database).await.expect("mysql");
    let redis = connections::redis(config).await.expect("redis");
    WorkerContext::new(config.clone(), db, redis)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_closes_overdue_orders_and_finishes_cut_short_returns() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let config = short_timeouts(&env, 1, 3600);
    let ctx = context(&config).await;
    let sale = create_sale(&env, &db, 10).await;
    // No close messages were scheduled for these (as if the worker died
    // right after the commit).
    let ids = admit(&env, &db, sale.id, &[1, 2, 3, 4], 1).await;
    let wallet = InProcessWallet::start(&config).await;
    wallet.credit(&[4], 10_000).await;
    let payments = Payments::new(db.clone(), ctx.keys.clone(), &wallet.config);
    let paid = match payments
        .pay(&mut ctx.redis.clone(), 4, &ids[3])
        .await
        .unwrap()
    {
        PayResult::Paid(o) => o,
        other => panic!("{other:?}"),
    };
    assert_eq!(paid.id, ids[3]);
    assert_eq!(redis_stock(&env, sale.id).await, 6);
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let report = sweeper::sweep(&ctx).await.expect("sweep");
    assert_eq!(report.orders_closed, 3, "{report:?}");
    for id in &ids[..3] {
        assert_eq!(
            order_status(&db, id).await,
            ("closed".into(), Some("timeout".into()))
        );
    }
    assert_eq!(order_status(&db, &ids[3]).await.0, "paid");
    assert_eq!(
        (
            stock_left(&db, sale.id).await,
            redis_stock(&env, sale.id).await
        ),
        (9, 9)
    );
    let again = sweeper::sweep(&ctx).await.expect("sweep");
    assert_eq!(again.orders_closed, 0);
    assert_eq!(
        redis_stock(&env, sale.id).await,
        9,
        "a second sweep returns nothing twice"
    );

    // A close whose Redis half never happened (the process died after the
    // commit): the sweeper finishes it, once.
    let mut redis = env.redis().await;
    let keys = env.keys().sale(sale.id);
    let _: i64 = redis.srem(keys.returned(), &ids[0]).await.unwrap();
    let _: i64 = redis.decr(keys.stock(), 1).await.unwrap();
    sqlx::query("UPDATE orders SET stock_returned_at = NULL, closed_at = NOW(3) - INTERVAL 1 MINUTE WHERE id = ?")
        .bind(&ids[0])
        .execute(&db)
        .await
        .unwrap();
    let report = sweeper::sweep(&ctx).await.expect("sweep");
    assert_eq!(report.stock_returns_finished, 1, "{report:?}");
    assert_eq!(redis_stock(&env, sale.id).await, 9);

    // Only one of two concurrent sweepers runs.
    let ctx2 = context(&config).await;
    let (a, b) = tokio::join!(sweeper::sweep_locked(&ctx), sweeper::sweep_locked(&ctx2));
    let ran = [a.expect("sweep a"), b.expect("sweep b")]
        .iter()
        .filter(|r| r.is_some())
        .count();
    assert_eq!(ran, 1, "the lock lets exactly one sweep");

    assert_audit_clean(&env, &db, sale.id).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paying_racing_the_timeout_close_ends_paid_xor_closed_1000_times() {
    pay_and_close_race(PaymentMode::Tcc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paying_racing_the_timeout_close_ends_paid_xor_closed_1000_times_in_xa() {
    pay_and_close_race(PaymentMode::Xa).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paying_racing_the_timeout_close_ends_paid_xor_closed_1000_times_by_message() {
    pay_and_close_race(PaymentMode::Message).await;
}

/// 1,000 orders expiring at once, each paid (in `mode`) and closed at
/// random moments around its expiry: each ends paid or closed, never both.
async fn pay_and_close_race(mode: PaymentMode) {
    const ORDERS: u64 = 1000;
    let env = TestEnv::new().await;
    let db = env.db().await;
    let mut config = short_timeouts(&env, 1800, 3600);
    config.payment.mode = mode;
    let ctx = Arc::new(context(&config).await);
    let sale = create_sale(&env, &db, ORDERS as u32).await;
    let users: Vec<u64> = (1..=ORDERS).collect();
    let wallet = InProcessWallet::start(&config).await;
    wallet.credit(&users, 10_000).await;
    let payments = Arc::new(Payments::new(db.clone(), ctx.keys.clone(), &wallet.config));
    let _messaging = payments.start_messaging(&wallet.config);
    let mut ids = Vec::new();
    for chunk in users.chunks(200) {
        ids.extend(admit(&env, &db, sale.id, chunk, 1800).await);
    }
    // Every order expires in 400 ms; pay and close each fire at a random
    // moment in the 800 ms around that instant.
    sqlx::query("UPDATE orders SET expires_at = NOW(3) + INTERVAL 400000 MICROSECOND")
        .execute(&db)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let user = users[i];
        let (pay_at, close_at) = {
            let mut rng = rand::rng();
            (rng.random_range(0..800u64), rng.random_range(0..800u64))
        };
        let (c1, c2, id1, id2) = (ctx.clone(), ctx.clone(), id.clone(), id.clone());
        let payments = payments.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(pay_at)).await;
            let mut redis = c1.redis.clone();
            let pay = payments.pay(&mut redis, user, &id1).await.expect("pay");
            (id1, Some(pay), None)
        }));
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(close_at)).await;
            let mut redis = c2.redis.clone();
            let close = orders::close_expired_one(&c2.db, &mut redis, &c2.keys, &id2)
                .await
                .expect("close");
            (id2, None, Some(close))
        }));
    }
    let mut paid_by_call = HashSet::new();
    let mut closed_by_call = HashSet::new();
    for t in tasks {
        let (id, pay, close) = t.await.expect("task");
        // Accepted (the message mode answers 202 and settles after).
        if let Some(PayResult::Paid(_) | PayResult::Settling(_)) = pay {
            assert!(paid_by_call.insert(id.clone()), "paid twice");
        }
        if let Some(CloseOutcome::Closed { .. }) = close {
            assert!(closed_by_call.insert(id.clone()), "closed twice");
        }
    }
    // A late pay closes the order itself; finish whatever is still due.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sweeper::sweep(&ctx).await.expect("sweep");
    let client = seckill_workers::payments::wallet_client::WalletClient::new(&wallet.config);
    let money = seckill_workers::payments::audit::run(&db, &client, Duration::from_secs(20))
        .await
        .expect("payments audit");
    assert!(money.ok, "{money:#?}");
    assert!(
        paid_by_call.is_disjoint(&closed_by_call),
        "an order was both paid and closed"
    );
    let paid = count(&db, "SELECT COUNT(*) FROM orders WHERE status = 'paid'").await;
    let closed = count(&db, "SELECT COUNT(*) FROM orders WHERE status = 'closed'").await;
    let both = count(
        &db,
        "SELECT COUNT(*) FROM orders WHERE paid_at IS NOT NULL AND closed_at IS NOT NULL",
    )
    .await;
    assert_eq!(paid + closed, ORDERS as i64);
    assert_eq!(both, 0);
    assert_eq!(paid, paid_by_call.len() as i64);
    eprintln!("{mode:?} races: {paid} paid, {closed} closed");
    assert!(
        paid > 0 && closed > 0,
        "the races went both ways (paid {paid}, closed {closed})"
    );
    // Every closed order gave back exactly one unit, in MySQL and Redis.
    assert_eq!(stock_left(&db, sale.id).await, closed);
    assert_eq!(redis_stock(&env, sale.id).await, closed);
    assert_audit_clean(&env, &db, sale.id).await;
    // Money: each paid order one debit of its amount, the closed ones none.
    assert_eq!(money.paid_orders, paid);
    wallet.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paying_a_paid_order_with_a_new_key_is_409_and_each_key_replays_its_answer() {
    let api = Api::start().await;
    let db = api.env.db().await;
    let sale = create_sale(&api.env, &db, 5).await;
    let ids = admit(&api.env, &db, sale.id, &[41], 1800).await;
    api.wallet.credit(&[41], 10_000).await;
    let first_key = api.key(41).await;
    let (s, first, _) = api.pay(&ids[0], 41, Some(&first_key)).await;
    assert_eq!(s, StatusCode::OK, "{first}");

    let new_key = api.key(41).await;
    let (s, body, h) = api.pay(&ids[0], 41, Some(&new_key)).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert_eq!(h["content-type"], "application/problem+json");
    assert_eq!(body["type"], "/problems/order-paid");
    assert_eq!(body["status"], 409);
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or("")
            .contains("already paid"),
        "{body}"
    );
    let (s, again, h) = api.pay(&ids[0], 41, Some(&new_key)).await;
    assert_eq!(
        (s, &again),
        (StatusCode::CONFLICT, &body),
        "the 409 replays"
    );
    assert_eq!(h["idempotent-replayed"], "true");
    let (s, replay, h) = api.pay(&ids[0], 41, Some(&first_key)).await;
    assert_eq!(
        (s, replay),
        (StatusCode::OK, first),
        "the first key still replays its 200"
    );
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(order_status(&db, &ids[0]).await.0, "paid");
    api.stop().await;
}

#[tokio::test]
async fn expiry_is_on_the_mysql_clock_the_guards_read() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let sale = create_sale(&env, &db, 5).await;
    // MySQL's clock two hours ahead of this process's (hosts drift); the
    // session timestamp stands in for the drifted server clock.
    let drifted = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(2)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("SET @@timestamp = UNIX_TIMESTAMP(NOW(6)) + 7200")
                    .execute(conn)
                    .await?;
                Ok(())
            })
        })
        .connect(&env.config.database.url)
        .await
        .expect("drifted pool");
    let ids = admit(&env, &drifted, sale.id, &[31], 1800).await;
    let (left, age): (i64, i64) = sqlx::query_as(
        "SELECT TIMESTAMPDIFF(SECOND, NOW(3), expires_at), \
                TIMESTAMPDIFF(SECOND, created_at, NOW(3)) FROM orders WHERE id = ?",
    )
    .bind(&ids[0])
    .fetch_one(&drifted)
    .await
    .expect("order row");
    assert!(
        (1_790..=1_800).contains(&left),
        "due in {left} s by the guards' clock, not 1800"
    );
    assert!(
        (0..=10).contains(&age),
        "created {age} s ago by MySQL's clock"
    );
    let mut redis = env.redis().await;
    let closed = orders::close_expired_one(&drifted, &mut redis, &env.keys(), &ids[0])
        .await
        .expect("close attempt");
    assert_eq!(closed, CloseOutcome::Unchanged, "not due for 30 minutes");
    drifted.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn unknown_statuses_and_close_reasons_are_errors() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let sale = create_sale(&env, &db, 5).await;
    let ids = admit(&env, &db, sale.id, &[21, 22], 1800).await;
    // A newer build's schema, with values this build has never heard of.
    sqlx::query(
        "ALTER TABLE orders \
         MODIFY status ENUM('unpaid', 'paid', 'closed', 'refunded') NOT NULL DEFAULT 'unpaid', \
         MODIFY close_reason ENUM('cancelled', 'timeout', 'fraud') NULL",
    )
    .execute(&db)
    .await
    .expect("widen the enums");
    sqlx::query("UPDATE orders SET status = 'refunded' WHERE id = ?")
        .bind(&ids[0])
        .execute(&db)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE orders SET status = 'closed', close_reason = 'fraud', closed_at = NOW(3) \
         WHERE id = ?",
    )
    .bind(&ids[1])
    .execute(&db)
    .await
    .unwrap();

    let err = orders::get_for_user(&db, 21, &ids[0])
        .await
        .expect_err("`refunded` is no status of this build");
    assert!(err.to_string().contains("refunded"), "{err}");
    let err = orders::list_for_user(&db, 21)
        .await
        .expect_err("the list fails the same way");
    assert!(err.to_string().contains("refunded"), "{err}");
    let err = orders::get_for_user(&db, 22, &ids[1])
        .await
        .expect_err("`fraud` is no close reason of this build");
    assert!(err.to_string().contains("fraud"), "{err}");
    env.cleanup().await;
}
