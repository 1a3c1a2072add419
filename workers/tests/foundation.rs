//! The foundation against the real services: schema, sale creation and
//! warm-up, and the binaries' lifecycle (health, metrics, SIGTERM).

use std::time::Duration;

use chrono::Utc;
use seckill_contracts::testkit::{free_addr, wait_ok, Process, TestEnv};
use seckill_workers::sales::{self, NewSale};

fn new_sale(stock: u32) -> NewSale {
    NewSale {
        title: "Phone'; DROP TABLE sales; --".into(),
        price_cents: 99_900,
        sale_price_cents: 19_900,
        stock,
        starts_at: Utc::now(),
        ends_at: Utc::now() + chrono::Duration::hours(1),
    }
}

#[tokio::test]
async fn sale_create_writes_mysql_and_warms_redis() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let mut redis = env.redis().await;
    let keys = env.keys();

    let sale = sales::create(&db, &mut redis, &keys, &new_sale(100))
        .await
        .expect("create");
    assert_eq!(sale.stock_total, 100);
    assert_eq!(sale.stock_left, 100);
    assert_eq!(
        sale.title, "Phone'; DROP TABLE sales; --",
        "stored verbatim, not executed"
    );
    assert_eq!(
        sales::redis_stock(&mut redis, &keys, sale.id)
            .await
            .unwrap(),
        Some(100)
    );
    let info: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.sale(sale.id).info())
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(info["stock_total"], "100");
    assert_eq!(
        info["ends_at_ms"],
        sale.ends_at.timestamp_millis().to_string()
    );

    // A live sale sold 30 (Redis says 70): re-warming must not hand them out again.
    let _: () = redis::cmd("SET")
        .arg(keys.sale(sale.id).stock())
        .arg(70)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(sales::warm(&mut redis, &keys, &sale).await.unwrap(), 70);
    // But a lower MySQL count (orders committed) does lower it.
    let mut lower = sale.clone();
    lower.stock_left = 60;
    assert_eq!(sales::warm(&mut redis, &keys, &lower).await.unwrap(), 60);
    env.cleanup().await;
}

#[tokio::test]
async fn invalid_sales_change_nothing() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let mut redis = env.redis().await;
    let keys = env.keys();
    let mut zero = new_sale(0);
    assert!(sales::create(&db, &mut redis, &keys, &zero).await.is_err());
    zero.stock = 5;
    zero.ends_at = zero.starts_at;
    assert!(sales::create(&db, &mut redis, &keys, &zero).await.is_err());
    let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM sales")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(count, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn one_order_per_user_and_sale_is_a_schema_guarantee() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let mut redis = env.redis().await;
    let sale = sales::create(&db, &mut redis, &env.keys(), &new_sale(5))
        .await
        .unwrap();
    let insert = |id: &'static str, req: &'static str| {
        sqlx::query(
            "INSERT INTO orders (id, request_id, user_id, sale_id, goods_id, amount_cents, expires_at) \
             VALUES (?, ?, 7, ?, ?, 100, NOW())",
        )
        .bind(id)
        .bind(req)
        .bind(sale.id)
        .bind(sale.goods_id)
    };
    insert("00000000-0000-7000-8000-000000000001", "r1")
        .execute(&db)
        .await
        .unwrap();
    let dup = insert("00000000-0000-7000-8000-000000000002", "r2")
        .execute(&db)
        .await;
    assert!(
        dup.is_err(),
        "UNIQUE(user_id, sale_id) must refuse a second order"
    );
    env.cleanup().await;
}

async fn assert_serves_then_stops(bin: &str, extra: &[&str], env: &TestEnv) {
    let addr = free_addr();
    let addr_s = addr.to_string();
    let mut args = vec!["--listen", addr_s.as_str()];
    args.extend_from_slice(extra);
    let mut p = Process::spawn(bin, &args, &env.env_vars());
    assert!(
        wait_ok(&format!("http://{addr}/healthz"), Duration::from_secs(20)).await,
        "{bin} never became healthy"
    );
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    p.signal("TERM");
    let status = p
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exits after SIGTERM");
    assert!(status.success(), "{bin} exit status {status}");
}

#[tokio::test]
async fn api_and_worker_binaries_serve_probes_and_stop_on_sigterm() {
    let env = TestEnv::new().await;
    assert_serves_then_stops(env!("CARGO_BIN_EXE_seckill-api"), &[], &env).await;
    assert_serves_then_stops(env!("CARGO_BIN_EXE_seckill-worker"), &[], &env).await;
    env.cleanup().await;
}

#[tokio::test]
async fn seckillctl_creates_and_shows_a_sale() {
    let env = TestEnv::new().await;
    let ctl = env!("CARGO_BIN_EXE_seckillctl");
    let out = std::process::Command::new(ctl)
        .args([
            "sale",
            "create",
            "--title",
            "Demo",
            "--price-cents",
            "1000",
            "--sale-price-cents",
            "500",
            "--stock",
            "3",
            "--duration",
            "10m",
        ])
        .envs(env.env_vars())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sale: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = sale["id"].as_u64().unwrap();
    let out = std::process::Command::new(ctl)
        .args(["sale", "show", &id.to_string()])
        .envs(env.env_vars())
        .output()
        .unwrap();
    assert!(out.status.success());
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["redis_stock"], 3);
    assert_eq!(shown["stock_total"], 3);
    let missing = std::process::Command::new(ctl)
        .args(["sale", "show", "999999"])
        .envs(env.env_vars())
        .output()
        .unwrap();
    assert!(!missing.status.success());
    env.cleanup().await;
}

#[test]
fn malformed_config_names_the_key_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[worker]\nbatch_size = -3\n").unwrap();
    for bin in [
        env!("CARGO_BIN_EXE_seckill-api"),
        env!("CARGO_BIN_EXE_seckill-worker"),
        env!("CARGO_BIN_EXE_seckillctl"),
    ] {
        let out = std::process::Command::new(bin)
            .args(["--config", path.to_str().unwrap(), "--check-config"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bin}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("worker.batch_size"), "{bin}: {err}");
    }
    let good = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/seckill.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_seckillctl"))
        .args(["--config", good, "--check-config"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

/// Several instances starting at once (two wallets, say) migrate one fresh
/// database together: every one succeeds and each migration runs once.
/// (sqlx's own lock is no lock on MariaDB; see `connections::migrate_with`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_migrating_one_database_at_once_all_succeed() {
    let env = seckill_contracts::testkit::TestEnv::new().await;
    let runs = (0..4).map(|_| seckill_workers::wallet::migrate(&env.config));
    for result in futures::future::join_all(runs).await {
        result.expect("a concurrent migration");
    }
    let wallet = sqlx::MySqlPool::connect(&env.config.wallet.database_url)
        .await
        .expect("wallet database");
    let applied: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success = 1")
            .fetch_one(&wallet)
            .await
            .unwrap();
    assert_eq!(
        applied,
        seckill_workers::wallet::MIGRATOR.iter().count() as i64
    );
    wallet.close().await;
    env.cleanup().await;
}
