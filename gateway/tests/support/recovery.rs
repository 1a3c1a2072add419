//! What the recovery tests (Redis emptied, broker restarted) share: a worker
//! with a fast sweeper, buyers whose answers are tallied, selling until sold
//! out, and the end-of-sale checks of SPEC invariants 1 to 4.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use seckill_contracts::testkit::{free_addr, wait_ok, Process};
use serde_json::Value;
use tokio::sync::Mutex;

use super::stack::{sibling_binary, Stack, StackOptions};

/// A recovery test's sale, open and partly sold before the fault.
pub struct OpenSale {
    pub stack: Arc<Stack>,
    pub worker: SweepingWorker,
    pub sale_id: u64,
    pub tally: Arc<Mutex<Tally>>,
}

impl OpenSale {
    /// A stack without its own worker (the [`SweepingWorker`] replaces it),
    /// a sale of `stock` open for 10 minutes, and users `1..=sold_before`
    /// each admitted once, as the sale's normal start before the fault.
    pub async fn start(stock: u32, sold_before: u64) -> OpenSale {
        let stack = Arc::new(
            Stack::start(StackOptions {
                worker: false,
                gateway_amqp_url: None,
                gateway_redis_url: None,
                payment_mode: None,
            })
            .await,
        );
        let worker = SweepingWorker::start(&stack).await;
        let sale_id = stack.create_sale(stock, 1, 600).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let tally = Arc::new(Mutex::new(Tally::default()));
        for user in 1..=sold_before {
            assert_eq!(attempt(&stack, sale_id, user, &tally).await, 202);
        }
        OpenSale {
            stack,
            worker,
            sale_id,
            tally,
        }
    }
}

/// What buyers were answered.
#[derive(Default)]
pub struct Tally {
    /// user → request_id of their 202
    pub queued: HashMap<u64, String>,
    /// status → count
    pub statuses: HashMap<u16, u32>,
}

/// One buyer's seckill attempt with a fresh hidden path; a user queued
/// twice fails the test.
pub async fn attempt(stack: &Stack, sale_id: u64, user: u64, tally: &Mutex<Tally>) -> u16 {
    let path = stack.issue_path(sale_id, user).await;
    let (status, _, body) = stack.seckill(user, &path, sale_id).await;
    let mut t = tally.lock().await;
    *t.statuses.entry(status).or_default() += 1;
    if status == 202 {
        let rid = body["request_id"].as_str().unwrap_or_default().to_string();
        assert!(
            t.queued.insert(user, rid).is_none(),
            "user {user} queued twice"
        );
    }
    status
}

/// A real `seckill-worker` on the stack's queues whose sweeper runs every
/// second and releases a reservation without a message after 3 s, so
/// recovery happens within a test's time.
pub struct SweepingWorker {
    pub config_arg: String,
    _process: Process,
    _dir: tempfile::TempDir,
}

impl SweepingWorker {
    pub async fn start(stack: &Stack) -> SweepingWorker {
        let dir = tempfile::tempdir().unwrap();
        let mut config = stack.config.clone();
        config.worker.listen = free_addr();
        config.worker.sweep_interval_secs = 1;
        config.worker.reservation_timeout_secs = 3;
        let config_path = dir.path().join("worker.toml");
        std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
        let config_arg = config_path.to_str().unwrap().to_string();
        let log = [("RUST_LOG".to_string(), "warn".to_string())];
        let process = Process::spawn(
            &sibling_binary("seckill-worker"),
            &["--config", &config_arg],
            &log,
        );
        assert!(
            wait_ok(
                &format!("http://{}/healthz", config.worker.listen),
                Duration::from_secs(30)
            )
            .await,
            "worker never became healthy"
        );
        SweepingWorker {
            config_arg,
            _process: process,
            _dir: dir,
        }
    }

    /// Runs `seckillctl <args>` with this worker's config → (success, JSON).
    pub async fn ctl(&self, args: &[&str]) -> (bool, Value) {
        super::stack::seckillctl(Path::new(&self.config_arg), args).await
    }
}

/// Buyers come until the sale answers 410: first those in `retry`, then new
/// users from `next` up to `last`. A 503 (the stack still recovering) puts
/// the buyer back in line.
pub async fn sell_out(
    stack: &Stack,
    sale_id: u64,
    mut retry: Vec<u64>,
    mut next: u64,
    last: u64,
    tally: &Mutex<Tally>,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "never sold out");
        let user = match retry.pop() {
            Some(u) => u,
            None if next <= last => {
                next += 1;
                next - 1
            }
            None => panic!("ran out of buyers before selling out"),
        };
        match attempt(stack, sale_id, user, tally).await {
            410 => return,
            503 => {
                retry.push(user);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ => {}
        }
    }
}

/// SPEC invariant 3 as the buyer sees it through the api: every 202 ends as
/// `success` naming the buyer's one order, or `failed` with no order; no
/// order exists without a 202; nothing oversold. Returns the order count.
pub async fn assert_every_admission_settled(
    stack: &Stack,
    sale_id: u64,
    stock: u32,
    queued: &HashMap<u64, String>,
) -> usize {
    let mut results: HashMap<u64, Value> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while results.len() < queued.len() {
        assert!(
            Instant::now() < deadline,
            "{} admitted requests never settled",
            queued.len() - results.len()
        );
        for user in queued.keys() {
            if results.contains_key(user) {
                continue;
            }
            let resp = stack
                .http
                .get(stack.url(&format!("/api/v1/sales/{sale_id}/result")))
                .bearer_auth(stack.token(*user))
                .send()
                .await
                .unwrap();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            if v["status"] == "success" || v["status"] == "failed" {
                results.insert(*user, v);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let db = stack.env.db().await;
    let orders: Vec<(u64, String)> =
        sqlx::query_as("SELECT user_id, id FROM orders WHERE sale_id = ?")
            .bind(sale_id)
            .fetch_all(&db)
            .await
            .unwrap();
    let by_user: HashMap<u64, String> = orders.iter().cloned().collect();
    assert_eq!(by_user.len(), orders.len(), "one order per buyer");
    assert!(orders.len() <= stock as usize, "oversold: {}", orders.len());
    for (user, result) in &results {
        match result["status"].as_str() {
            Some("success") => assert_eq!(
                result["order_id"].as_str(),
                by_user.get(user).map(String::as_str),
                "user {user}'s success names their order"
            ),
            _ => assert!(
                !by_user.contains_key(user),
                "user {user} failed yet has an order"
            ),
        }
    }
    for user in by_user.keys() {
        assert!(
            queued.contains_key(user),
            "order for user {user} without a 202"
        );
    }
    orders.len()
}

/// `seckillctl audit` must pass (invariants 1, 2, 4) and Redis stock plus
/// unclosed orders must equal the stock. Returns the report.
pub async fn assert_audit_clean(worker: &SweepingWorker, sale_id: u64, stock: u32) -> Value {
    let sale = sale_id.to_string();
    let (ok, report) = worker
        .ctl(&["audit", "--sale", &sale, "--wait", "20s"])
        .await;
    assert!(ok, "audit: {report}");
    assert_eq!(report["ok"], true, "{report}");
    let unclosed =
        report["orders_unpaid"].as_i64().unwrap() + report["orders_paid"].as_i64().unwrap();
    assert_eq!(
        unclosed + report["redis_stock"].as_i64().unwrap(),
        i64::from(stock),
        "{report}"
    );
    report
}
