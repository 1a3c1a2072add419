//! The edge micro-cache of the sale pages, through the real gateway and two
//! apis on MySQL and Redis: a stampede on a sale page costs the api one
//! request, the cached page still carries the current `server_time`, a
//! stale page is refreshed by one request while the others get it, stock
//! moves show within the freshness, and what must not be cached (a 404, a
//! page of a bad id) never is.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use serde_json::Value;
use support::stack::{Stack, StackOptions};

/// The sale detail route as the api labels its metrics.
const DETAIL: &str = "route=\"/api/v1/sales/{id}\"";

/// GETs of the sale detail route both apis have answered so far.
async fn api_detail_requests(stack: &Stack) -> u64 {
    let mut total = 0;
    for (addr, _) in &stack.apis {
        let text = stack
            .http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        total += text
            .lines()
            .filter(|l| l.starts_with("seckill_api_requests_total{") && l.contains(DETAIL))
            .filter(|l| l.contains("method=\"GET\""))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>() as u64;
    }
    total
}

/// `n` concurrent GETs of `path`: their `X-Cache` values counted, and the
/// bodies.
async fn stampede(stack: &Stack, path: &str, n: usize) -> (BTreeMap<String, usize>, Vec<Value>) {
    let url = stack.url(path);
    let calls = (0..n).map(|_| {
        let (http, url) = (stack.http.clone(), url.clone());
        async move {
            let resp = http.get(url).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let cache = resp.headers()["x-cache"].to_str().unwrap().to_string();
            (cache, resp.json::<Value>().await.unwrap())
        }
    });
    let mut seen = BTreeMap::new();
    let mut bodies = Vec::new();
    for (cache, body) in futures::future::join_all(calls).await {
        *seen.entry(cache).or_default() += 1;
        bodies.push(body);
    }
    (seen, bodies)
}

fn server_time(body: &Value) -> DateTime<Utc> {
    body["server_time"]
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| panic!("no server_time in {body}"))
}

#[tokio::test]
async fn sale_pages_cost_the_api_one_request_per_second_and_stay_correct() {
    let stack = Stack::start(StackOptions {
        worker: false,
        gateway_amqp_url: None,
        gateway_redis_url: None,
        payment_mode: None,
    })
    .await;
    let sale = stack.create_sale(5, 3600, 600).await;
    let path = format!("/api/v1/sales/{sale}");

    // A stampede on a page nobody fetched yet: one request goes upstream,
    // the others wait for it.
    let before = api_detail_requests(&stack).await;
    let (seen, bodies) = stampede(&stack, &path, 200).await;
    assert_eq!(seen.get("MISS"), Some(&1), "{seen:?}");
    assert_eq!(seen.get("HIT"), Some(&199), "{seen:?}");
    assert_eq!(api_detail_requests(&stack).await - before, 1);
    for b in &bodies {
        assert_eq!(b["id"], sale);
        assert_eq!(b["stock_left"], 5);
    }

    // A hit tells the time of now, not of the fetch.
    let fetched = server_time(&bodies[0]);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (seen, bodies) = stampede(&stack, &path, 1).await;
    assert_eq!(seen.get("HIT"), Some(&1));
    let shown = server_time(&bodies[0]);
    assert!(
        shown - fetched >= chrono::Duration::milliseconds(500),
        "server_time is rewritten on a hit: {fetched} then {shown}"
    );
    assert!((Utc::now() - shown).num_milliseconds().abs() < 1_000);

    // Stock moves show once the page is past its second: the first request
    // after it refreshes the page while the others are answered from it.
    let mut redis = stack.env.redis().await;
    let _: i64 = redis
        .decr(stack.env.keys().sale(sale).stock(), 2)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let before = api_detail_requests(&stack).await;
    let (seen, _) = stampede(&stack, &path, 50).await;
    assert_eq!(seen.get("MISS"), Some(&1), "one refresh: {seen:?}");
    assert_eq!(api_detail_requests(&stack).await - before, 1);
    let (_, bodies) = stampede(&stack, &path, 1).await;
    assert_eq!(
        bodies[0]["stock_left"], 3,
        "the refreshed page has the new stock"
    );

    // The list is cached the same way.
    let (seen, _) = stampede(&stack, "/api/v1/sales", 20).await;
    assert_eq!(seen.get("MISS"), Some(&1), "{seen:?}");

    // Refusals are never stored: each goes to the api and says so.
    for bad in [
        "/api/v1/sales/999999999",
        "/api/v1/sales/abc",
        "/api/v1/sales/1%27%20OR%201=1",
    ] {
        for _ in 0..3 {
            let resp = stack.http.get(stack.url(bad)).send().await.unwrap();
            assert!(resp.status().is_client_error(), "{bad}: {}", resp.status());
            assert_eq!(resp.headers()["x-cache"], "MISS", "{bad}");
        }
    }
    stack.cleanup().await;
}
