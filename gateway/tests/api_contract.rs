//! The OpenAPI document against the running stack: the real gateway with
//! the repository's rules, two api processes, a worker, and the real
//! stores.
//!
//! - the document lists exactly the routes the stack serves: every
//!   operation reaches a handler through the gateway, the gateway's own
//!   route table agrees on which are public, and every gateway route
//!   leads to a documented operation;
//! - schemathesis (an independent client) fuzzes every operation and
//!   follows the document's links, checking statuses, schemas, headers
//!   and content types against the document;
//! - a client generated from the document by openapi-python-client does
//!   the buyer's whole journey.
//!
//! The Python tools live in a venv made by `scripts/lib/api_contract_tools.sh`
//! (scripts/test makes it first; this test makes it when missing).

mod support;

use std::time::Duration;

use seckill_gateway::routes::RouteTable;
use serde_json::Value;
use support::python_tools::{contract_file, run_tool};
use support::stack::{Stack, StackOptions, ADMIN_TOKEN};

fn opts() -> StackOptions {
    StackOptions {
        worker: true,
        gateway_amqp_url: None,
        gateway_redis_url: None,
        payment_mode: None,
    }
}

/// `(method, path template, operation)` of every documented operation.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            ops.push((method.to_ascii_uppercase(), path.clone(), op.clone()));
        }
    }
    ops
}

/// A concrete path for a template: ids that exist nowhere, a well-formed
/// hidden path.
fn concrete(template: &str) -> String {
    template
        .replace("{id}", "1")
        .replace("{sale_id}", "1")
        .replace("{path}", &"0".repeat(32))
}

fn is_authenticated(op: &Value) -> bool {
    op["security"].as_array().is_some_and(|s| !s.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_document_lists_exactly_the_routes_the_stack_serves() {
    let stack = Stack::start(opts()).await;
    let resp = stack
        .http
        .get(stack.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let doc: Value = resp.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let ops = operations(&doc);
    assert!(ops.len() >= 17, "{} operations", ops.len());

    // Documented → served: each operation reaches a handler (no fallback
    // answer of the gateway or the api) and needs a token iff documented.
    let token = stack.token(990_001);
    for (method, template, op) in &ops {
        let url = stack.url(&concrete(template));
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let anonymous = stack.http.request(m.clone(), &url).send().await.unwrap();
        let status = anonymous.status().as_u16();
        if is_authenticated(op) {
            assert_eq!(status, 401, "{method} {template} without a token");
        } else {
            assert_ne!(status, 401, "{method} {template} is public");
        }
        let resp = stack
            .http
            .request(m, &url)
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap();
        assert_ne!(status, 405, "{method} {template}: {body}");
        assert!(
            !body.contains("no route for this path") && !body.contains("no such route"),
            "{method} {template} is documented but not served: {status} {body}"
        );
        let documented = op["responses"]
            .as_object()
            .unwrap()
            .contains_key(&status.to_string());
        assert!(
            documented,
            "{method} {template} answered an undocumented {status}: {body}"
        );
    }

    // A documented path with an undocumented method: 405 with what is allowed.
    let trace = stack
        .http
        .request(reqwest::Method::TRACE, stack.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(trace.status(), 405);
    assert_eq!(trace.headers()["allow"], "GET, HEAD");
    // Also where the authenticated catch-all would have taken it (a 401).
    let delete = stack
        .http
        .delete(stack.url("/api/v1/sales"))
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 405);
    assert_eq!(delete.headers()["allow"], "GET, HEAD");

    // The gateway's table agrees: each documented operation matches a
    // route, public exactly when the document needs no token.
    let table = RouteTable::new(&stack.config.gateway.routes).unwrap();
    for (method, template, op) in &ops {
        let path = concrete(template);
        let route = table
            .find(method, &path)
            .unwrap_or_else(|| panic!("no gateway route for {method} {template}"));
        assert_eq!(
            route.route.public,
            !is_authenticated(op),
            "gateway route `{}` for {method} {template}",
            route.route.name
        );
    }

    // Served → documented: every gateway route leads to a documented
    // operation (a route the document lacks would be a dead or secret one),
    // and every route the gateway answers itself is documented exactly.
    // The web pages (storefront, /ops) and the dashboard's admin data are
    // not part of the public API; the browser tests cover them.
    let outside_api = |r: &seckill_contracts::config::RouteConfig| {
        r.path.starts_with("/ops") || (r.files && !r.path.starts_with("/api/"))
    };
    for route in stack
        .config
        .gateway
        .routes
        .iter()
        .filter(|r| !outside_api(r))
    {
        let reached = ops.iter().any(|(method, template, _)| {
            table
                .find(method, &concrete(template))
                .is_some_and(|m| m.route.name == route.name)
        });
        assert!(
            reached,
            "gateway route `{}` reaches no documented operation",
            route.name
        );
        if route.pool.is_none() && !route.files {
            let documented = ops
                .iter()
                .any(|(m, t, _)| m == &route.method && t == &route.path);
            assert!(documented, "local route `{}` is not documented", route.name);
        }
    }

    // The readable reference, served by the gateway from web/api/docs/
    // (the api does not have it): gzip when asked, 304 when unchanged.
    let page = stack.http.get(stack.url("/api/docs")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["cache-control"], "no-cache");
    let html = page.text().await.unwrap();
    assert!(html.contains("/api/v1/openapi.json") && html.contains("redoc.standalone.js"));
    let script_url = stack.url("/api/docs/redoc.standalone.js");
    let plain = stack.http.get(&script_url).send().await.unwrap();
    assert_eq!(plain.status(), 200);
    let etag = plain.headers()["etag"].to_str().unwrap().to_string();
    let plain_len = plain.bytes().await.unwrap().len();
    let zipped = stack
        .http
        .get(&script_url)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(zipped.headers()["content-encoding"], "gzip");
    let zipped_len = zipped.bytes().await.unwrap().len();
    assert!(
        zipped_len * 3 < plain_len,
        "{zipped_len} of {plain_len} bytes"
    );
    let unchanged = stack
        .http
        .get(&script_url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(unchanged.status(), 304);
    // HEAD answers the headers only: the next request on the connection
    // still parses.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    for _ in 0..2 {
        let head = client.head(&script_url).send().await.unwrap();
        assert_eq!(head.status(), 200);
        assert!(head.bytes().await.unwrap().is_empty());
        let page = client.get(stack.url("/api/docs")).send().await.unwrap();
        assert!(page.text().await.unwrap().contains("<redoc"));
    }
    let api = stack.apis[0].0;
    let direct = stack
        .http
        .get(format!("http://{api}/api/docs"))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 404, "no upstream hop: the api has no docs");
    stack.cleanup().await;
}

/// Two sales open a moment after creation, for 10 minutes.
async fn open_sales(stack: &Stack) -> (u64, u64) {
    let a = stack.create_sale(20, 1, 600).await;
    let b = stack.create_sale(20, 1, 600).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schemathesis_finds_nothing_against_the_running_stack() {
    let stack = Stack::start(opts()).await;
    open_sales(&stack).await;
    let (_, token) = stack.sign_up(&format!("fuzz_{}", &stack.env.id[..8])).await;
    let base = stack.url("");
    let report = tempfile::tempdir().unwrap();
    let args = [
        "--config-file",
        &contract_file("schemathesis.toml"),
        "run",
        &format!("{base}/api/v1/openapi.json"),
        "--url",
        &base,
        "--seed",
        "20261202",
        "--report",
        "junit",
        "--report-dir",
        report.path().to_str().unwrap(),
        "--no-color",
    ]
    .map(String::from);
    let env = [("SECKILL_FUZZ_TOKEN", token.as_str())];
    let (ok, output) = run_tool("schemathesis", &args, &env, Duration::from_secs(600)).await;
    assert!(ok, "schemathesis found problems:\n{output}");
    let summary: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("generated") || l.contains("Tested:") || l.contains("Selected:"))
        .collect();
    eprintln!("schemathesis: {}", summary.join(" | "));
    assert!(
        summary.iter().any(|l| l.contains("Tested: 17")),
        "every operation but the document itself is tested: {output}"
    );
    stack.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_generated_from_the_document_completes_the_buyer_journey() {
    let stack = Stack::start(opts()).await;
    let (pay_sale, cancel_sale) = open_sales(&stack).await;
    let keys = stack.env.keys();
    // The captcha key of sale SALE and user {user_id}, as the api names it.
    let captcha_key = keys
        .sale(424_242)
        .captcha(0)
        .replace("424242", "SALE")
        .replace(":captcha:0", ":captcha:{user_id}");
    let args = [
        contract_file("journey.py"),
        "--url".into(),
        stack.url(""),
        "--redis-url".into(),
        stack.config.redis.url.clone(),
        "--captcha-key".into(),
        captcha_key,
        "--sale-id".into(),
        pay_sale.to_string(),
        "--cancel-sale-id".into(),
        cancel_sale.to_string(),
        "--wallet-url".into(),
        stack.wallet_url.clone(),
        "--admin-token".into(),
        ADMIN_TOKEN.into(),
    ];
    let (ok, output) = run_tool("python", &args, &[], Duration::from_secs(180)).await;
    assert!(ok, "the generated client's journey failed:\n{output}");
    let result: Value = serde_json::from_str(output.lines().next().unwrap_or("")).unwrap();
    let paid = result["paid"].as_str().unwrap();
    let (status,): (String,) = sqlx::query_as("SELECT status FROM orders WHERE id = ?")
        .bind(paid)
        .fetch_one(&stack.env.db().await)
        .await
        .unwrap();
    assert_eq!(status, "paid");
    stack.cleanup().await;
}
