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
//! The Python tools live in a venv made by `scripts/lib/api_tools.sh`
//! (scripts/test makes it first; this test makes it when missing).

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use seckill_gateway::routes::RouteTable;
use serde_json::Value;
use support::stack::{repo_root, Stack, StackOptions};

fn opts() -> StackOptions {
    StackOptions {
        worker: true,
        gateway_amqp_url: None,
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
            !body.contains("no route for this method and path") && !body.contains("no such route"),
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
    for route in &stack.config.gateway.routes {
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
        if route.pool.is_none() {
            let documented = ops
                .iter()
                .any(|(m, t, _)| m == &route.method && t == &route.path);
            assert!(documented, "local route `{}` is not documented", route.name);
        }
    }

    // The readable reference, through the gateway.
    let page = stack.http.get(stack.url("/api/docs")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("/api/v1/openapi.json") && html.contains("redoc.standalone.js"));
    let script = stack
        .http
        .get(stack.url("/api/docs/redoc.standalone.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(script.status(), 200);
    assert!(script.bytes().await.unwrap().len() > 100_000);
    stack.cleanup().await;
}

/// The venv with schemathesis and openapi-python-client, made once per
/// test process by `scripts/lib/api_tools.sh`.
fn api_tools() -> &'static PathBuf {
    static TOOLS: OnceLock<PathBuf> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let root = repo_root();
        let out = Command::new("bash")
            .current_dir(&root)
            .args([
                "-c",
                "source scripts/lib/api_tools.sh && ensure_api_tools >&2 && echo \"$SECKILL_API_TOOLS\"",
            ])
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "could not prepare the Python API tools:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        PathBuf::from(path)
    })
}

/// Runs a tool under `scripts/api-tools/` with the venv first on PATH;
/// panics with its output unless it succeeds. Returns stdout.
fn run_tool(tool: &str, args: &[&str], timeout: Duration) -> String {
    let venv = api_tools().clone();
    let tool = repo_root().join("scripts/api-tools").join(tool);
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let handle = std::thread::spawn(move || {
        let path = format!(
            "{}:{}",
            venv.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Command::new(venv.join("bin/python"))
            .arg(&tool)
            .args(&args)
            .env("PATH", path)
            .env("VIRTUAL_ENV", &venv)
            .output()
            .expect("running the tool")
    });
    let started = std::time::Instant::now();
    while !handle.is_finished() {
        assert!(
            started.elapsed() < timeout,
            "tool ran longer than {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = handle.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{} failed:\n{stdout}\n{}",
        tool_name(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn tool_name(out: &std::process::Output) -> String {
    format!("tool (exit {:?})", out.status.code())
}
