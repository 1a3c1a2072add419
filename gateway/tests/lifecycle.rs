//! The gateway binary's lifecycle: health, proxying with header hygiene,
//! the admin listener's auth and metrics, and a clean SIGTERM.

mod support;

use std::time::Duration;

use support::{GatewayProc, Upstream};

#[tokio::test]
async fn serves_health_proxies_and_stops_on_sigterm() {
    let upstream = Upstream::start("a").await;
    let mut gw = GatewayProc::start(&[upstream.addr], &[]).await;
    let client = reqwest::Client::new();

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
    let metrics = client
        .get(gw.admin_url("/metrics"))
        .bearer_auth(&gw.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    assert!(text.contains("gateway_requests_total"), "{text}");

    gw.process.signal("TERM");
    let status = gw
        .process
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("gateway exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
}
