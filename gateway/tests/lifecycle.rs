//! The gateway binary's lifecycle: health, proxying with header hygiene,
//! the admin listener's auth and metrics, and a draining SIGTERM.

mod support;

use std::time::Duration;

use seckill_contracts::testkit::TestEnv;
use support::{write_rules, GatewayProc, Upstream};

const PASS_THROUGH: &str = "return { access = function(req) end }";

#[tokio::test]
async fn serves_health_proxies_and_drains_on_sigterm() {
    let env = TestEnv::new().await;
    let rules = tempfile::tempdir().unwrap();
    let rules_dir = rules.path().join("lua");
    write_rules(&rules_dir, PASS_THROUGH, &[]);
    let upstream = Upstream::start("a").await;
    let mut gw = GatewayProc::start(GatewayProc::config(&env, &[upstream.addr], &rules_dir)).await;
    let client = reqwest::Client::new();

    // Public route, client-sent identity headers.
    let resp = client
        .get(gw.url("/api/v1/sales"))
        .header("x-user-id", "1")
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    assert_eq!(resp.text().await.unwrap(), "a");
    let seen = upstream.seen.lock().unwrap().last().cloned().unwrap();
    assert!(
        seen.headers.get("x-user-id").is_none(),
        "client X-User-Id must be stripped"
    );
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert!(seen.headers.contains_key("x-request-id"));

    // Authenticated route: X-User-Id is the verified subject, never the client's.
    let resp = client
        .get(gw.url("/api/v1/orders"))
        .bearer_auth(gw.token(77))
        .header("x-user-id", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = upstream.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.headers["x-user-id"], "77");

    let missing = client.get(gw.url("/nowhere")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );

    let anon = client.get(gw.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(anon.status(), 401);
    assert_eq!(anon.headers()["www-authenticate"], "Bearer");
    let wrong = client
        .get(gw.admin_url("/metrics"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let text = gw.metrics().await;
    for name in [
        "gateway_requests_total",
        "gateway_request_duration_seconds",
        "gateway_upstream_healthy",
    ] {
        assert!(text.contains(name), "{name} missing from metrics");
    }
    let upstreams: serde_json::Value = client
        .get(gw.admin_url("/admin/upstreams"))
        .bearer_auth(&gw.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(upstreams["api"][0]["healthy"], true);

    // An in-flight request survives SIGTERM; new connections are refused after.
    let slow_url = gw.url("/api/v1/sales/slow");
    let slow =
        tokio::spawn(async move { reqwest::get(slow_url).await.map(|r| r.status().as_u16()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.process.signal("TERM");
    assert_eq!(
        slow.await.unwrap().unwrap(),
        200,
        "in-flight request drained"
    );
    let status = gw
        .process
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("gateway exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert!(reqwest::get(gw.url("/healthz")).await.is_err());
}

#[tokio::test]
async fn graceful_upgrade_hands_over_the_listeners_without_failed_requests() {
    use seckill_contracts::testkit::Process;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let env = TestEnv::new().await;
    let rules = tempfile::tempdir().unwrap();
    let rules_dir = rules.path().join("lua");
    write_rules(&rules_dir, PASS_THROUGH, &[]);
    let upstream = Upstream::start("a").await;
    let mut old = GatewayProc::start(GatewayProc::config(&env, &[upstream.addr], &rules_dir)).await;

    // Traffic runs throughout the hand-over. Like any HTTP/1.1 client, it
    // resends an idempotent GET once when a keep-alive connection is closed
    // under it (the close/request race no server can rule out); what must
    // not happen is a refused connection or a failure on the retry.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let url = old.url("/api/v1/sales");
    let traffic = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let mut result = client.get(&url).send().await;
                if matches!(&result, Err(e) if e.is_request() && !e.is_connect()) {
                    result = client.get(&url).send().await;
                }
                match result {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("upgrade failure: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
    };

    let mut new = Process::spawn(
        env!("CARGO_BIN_EXE_seckill-gateway"),
        &["--config", old.config_path.to_str().unwrap(), "--upgrade"],
        &[("RUST_LOG".into(), "warn".into())],
    );
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    old.process.signal("QUIT");
    let exited = old.process.wait_exit(Duration::from_secs(30)).await;
    assert!(
        exited.is_some(),
        "old gateway did not exit after handing over"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();

    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the upgrade"
    );
    assert!(ok.load(Ordering::Relaxed) > 50);
    let r = reqwest::get(old.url("/healthz")).await.unwrap();
    assert_eq!(r.status(), 200, "the new process serves the same port");
    assert!(
        new.wait_exit(Duration::from_millis(10)).await.is_none(),
        "new gateway is running"
    );
    new.signal("TERM");
    assert!(new.wait_exit(Duration::from_secs(20)).await.is_some());
}
