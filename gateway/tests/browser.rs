//! The storefront (`/`) and the live dashboard (`/ops`) in a real browser:
//! Debian's chromium driven by Playwright (`scripts/browser/*.py`) against
//! the real gateway serving `web/`, two apis and a worker.
//!
//! - a buyer's whole journey: register, log in, the countdown opens the
//!   sale, captcha (the answer read from Redis, as a person reads the PNG),
//!   hidden path, seckill, result, pay; a second buyer at 390 px is told
//!   "sold out";
//! - the dashboard during a `seckillctl demo` run: stock falls to 0 and
//!   admissions reach the stock; a broken rule reloaded from the dashboard
//!   shows its compile error while the old version keeps serving; audit.
//!
//! Each script fails on any browser console error it was not told to
//! expect. With `SECKILL_UPDATE_SCREENSHOTS=1` the screenshots land in
//! `docs/` (the README shows them); otherwise in a scratch folder.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use support::python_tools::{api_tools, chromium, run_tool};
use support::stack::{repo_root, sibling_binary, Stack, StackOptions, ADMIN_TOKEN};

fn opts() -> StackOptions {
    StackOptions {
        worker: true,
        gateway_amqp_url: None,
        gateway_redis_url: None,
        payment_mode: None,
    }
}

/// Where the screenshots go, and the scratch folder kept alive meanwhile.
fn screenshots() -> (PathBuf, Option<tempfile::TempDir>) {
    if std::env::var_os("SECKILL_UPDATE_SCREENSHOTS").is_some() {
        (repo_root().join("docs"), None)
    } else {
        let dir = tempfile::tempdir().unwrap();
        (dir.path().to_path_buf(), Some(dir))
    }
}

/// Chromium and the venv, made before a sale's clock starts: a first run
/// may install them for a minute.
async fn prepare_browser() -> PathBuf {
    tokio::task::spawn_blocking(|| {
        api_tools();
        chromium().clone()
    })
    .await
    .unwrap()
}

/// Runs `scripts/browser/<script>` with `args`; panics with its output on
/// failure; returns its last line (the JSON summary).
async fn run_browser_script(script: &str, args: Vec<String>, timeout: Duration) -> Value {
    let chromium = prepare_browser().await;
    let mut all = vec![
        repo_root()
            .join("scripts/browser")
            .join(script)
            .to_string_lossy()
            .into_owned(),
        "--chromium".to_string(),
        chromium.to_string_lossy().into_owned(),
    ];
    all.extend(args);
    let (ok, output) = run_tool("python", &all, &[], timeout).await;
    assert!(ok, "{script} failed:\n{output}");
    let summary = output
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .unwrap_or_else(|| panic!("{script} printed no JSON summary:\n{output}"));
    assert_eq!(summary["ok"], true, "{output}");
    summary
}

async fn audit_is_clean(stack: &Stack, sale: u64) {
    let resp = stack
        .http
        .post(stack.url(&format!("/ops/api/sales/{sale}/audit")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let audit: Value = resp.json().await.unwrap();
    assert_eq!(audit["ok"], true, "{audit:#}");
}

#[tokio::test]
async fn a_buyer_buys_in_the_browser_and_a_late_one_is_told_sold_out() {
    prepare_browser().await;
    let stack = Stack::start(opts()).await;
    // Opens while the script waits on its countdown.
    let sale = stack.create_sale(1, 10, 3600).await;
    let (shots, _scratch) = screenshots();
    let captcha_key = format!("{}:{{sale:SALE}}:captcha:USER", stack.env.id);
    let summary = run_browser_script(
        "storefront.py",
        vec![
            "--gateway".into(),
            stack.url(""),
            "--redis-url".into(),
            stack.config.redis.url.clone(),
            "--captcha-key".into(),
            captcha_key,
            "--sale".into(),
            sale.to_string(),
            "--screenshots".into(),
            shots.to_string_lossy().into_owned(),
            "--wallet-url".into(),
            stack.wallet_url.clone(),
            "--admin-token".into(),
            ADMIN_TOKEN.into(),
        ],
        Duration::from_secs(120),
    )
    .await;
    println!("{summary}");

    // What the browser showed is what MySQL holds: one order, paid.
    let db = stack.env.db().await;
    let orders: Vec<(String, String)> =
        sqlx::query_as("SELECT id, status FROM orders WHERE sale_id = ?")
            .bind(sale)
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(orders.len(), 1, "{orders:?}");
    assert_eq!(orders[0].0, summary["order_id"].as_str().unwrap());
    assert_eq!(orders[0].1, "paid");
    for name in ["storefront-desktop.png", "storefront-mobile.png"] {
        assert!(shots.join(name).exists(), "{name} was not taken");
    }
    audit_is_clean(&stack, sale).await;
    stack.cleanup().await;
}

/// Bytes on the wire for `path` with gzip accepted (the gateway's
/// content-length of what it sent).
async fn wire_bytes(http: &reqwest::Client, url: &str) -> (u64, String) {
    let resp = http
        .get(url)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{url}");
    let zipped = resp.headers().get("content-encoding").is_some();
    let len = resp.content_length().unwrap_or(0);
    let body = resp.bytes().await.unwrap();
    let text = if zipped {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&body[..]), &mut out)
            .unwrap();
        out
    } else {
        String::from_utf8_lossy(&body).into_owned()
    };
    (len, text)
}

/// The storefront's first load: the page, every file it links, and the
/// sales list its script asks for, under 100 KB compressed.
#[tokio::test]
async fn the_storefront_first_load_is_under_100_kb_compressed() {
    let stack = Stack::start(StackOptions {
        worker: false,
        gateway_amqp_url: None,
        gateway_redis_url: None,
        payment_mode: None,
    })
    .await;
    stack.create_sale(10, 60, 3600).await;
    let http = reqwest::Client::builder().no_gzip().build().unwrap();
    let (mut total, page) = wire_bytes(&http, &stack.url("/")).await;
    let linked: Vec<&str> = page
        .split(['"', '\''])
        .filter(|s| s.starts_with("/store/"))
        .collect();
    assert!(linked.len() >= 3, "{linked:?}");
    for asset in &linked {
        total += wire_bytes(&http, &stack.url(asset)).await.0;
    }
    total += wire_bytes(&http, &stack.url("/api/v1/sales")).await.0;
    println!("storefront first load: {total} bytes compressed ({linked:?} + /api/v1/sales)");
    assert!(total < 100 * 1024, "{total} bytes");
    stack.cleanup().await;
}

#[tokio::test]
async fn the_dashboard_follows_a_demo_and_shows_a_refused_rule() {
    const STOCK: u32 = 20;
    let stack = Stack::start(opts()).await;
    let sale = stack.create_sale(STOCK, -1, 3600).await;
    let (shots, _scratch) = screenshots();
    let demo = format!(
        "RUST_LOG=warn '{}' --config '{}' demo --sale {sale} --buyers 300 --concurrency 50 \
         --timeout 60s --json --no-progress",
        sibling_binary("seckillctl"),
        stack.config_path.display()
    );
    let summary = run_browser_script(
        "dashboard.py",
        vec![
            "--gateway".into(),
            stack.url(""),
            "--admin-token".into(),
            ADMIN_TOKEN.into(),
            "--sale".into(),
            sale.to_string(),
            "--stock".into(),
            STOCK.to_string(),
            "--demo-cmd".into(),
            demo,
            "--rules-dir".into(),
            stack
                .config
                .gateway
                .rules_dir
                .to_string_lossy()
                .into_owned(),
            "--screenshots".into(),
            shots.to_string_lossy().into_owned(),
        ],
        Duration::from_secs(200),
    )
    .await;
    println!("{summary}");
    assert!(shots.join("ops-dashboard.png").exists());
    audit_is_clean(&stack, sale).await;
    stack.cleanup().await;
}
