//! Hot reload through the real gateway: under load, with broken versions,
//! by file change, by SIGHUP; in-flight requests never fail.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use seckill_contracts::config::RouteConfig;
use seckill_contracts::testkit::TestEnv;
use support::{write_rules, GatewayProc};

fn versioned(v: u32) -> String {
    format!(
        r#"
local VERSION = {v}
return {{
  access = function(req)
    return seckill.respond(200, {{ version = VERSION, user = req.user_id }})
  end,
  log = function(req, res) end,
  selftest = function() return VERSION > 0 end,
}}
"#
    )
}

/// Five ways to be broken: syntax, no access phase, a failing selftest, a
/// wrong return type, a runaway top level.
fn broken(i: u32) -> String {
    match i % 5 {
        0 => "return { access = function(req) return ".into(),
        1 => "return { log = function() end }".into(),
        2 => "return { access = function() end, selftest = function() error('nope') end }".into(),
        3 => "return 42".into(),
        _ => "while true do end".into(),
    }
}

fn local_route() -> RouteConfig {
    RouteConfig::local("probe", "GET", "/probe")
}

async fn gateway(env: &TestEnv, dir: &std::path::Path) -> GatewayProc {
    let mut config = GatewayProc::config(env, &[], dir);
    config.gateway.pools.clear();
    config.gateway.routes = vec![local_route()];
    GatewayProc::start(config).await
}

#[tokio::test]
async fn reload_under_load_never_fails_a_request() {
    let env = TestEnv::new().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lua");
    write_rules(&dir, &versioned(1), &[]);
    let gw = Arc::new(gateway(&env, &dir).await);
    let token = gw.token(9);

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for _ in 0..16 {
        let (gw, token, stop, done, failures) = (
            gw.clone(),
            token.clone(),
            stop.clone(),
            done.clone(),
            failures.clone(),
        );
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) || done.load(Ordering::Relaxed) < 20_000 {
                let r = client
                    .get(gw.url("/probe"))
                    .bearer_auth(&token)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        let body: serde_json::Value = r.json().await.unwrap();
                        if body["user"] != 9 || !body["version"].is_u64() {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("non-rule body {body}"));
                        }
                    }
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                }
                if done.fetch_add(1, Ordering::Relaxed) > 200_000 {
                    break;
                }
            }
        }));
    }

    let mut last_good = 1;
    let mut refused = 0;
    for i in 0..20u32 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let is_broken = i % 4 == 3; // 5 of 20
        let src = if is_broken {
            broken(i)
        } else {
            versioned(i + 2)
        };
        std::fs::write(dir.join("main.lua"), src).unwrap();
        let (status, body) = gw.reload().await;
        if is_broken {
            assert_eq!(status, 422, "broken version {i} accepted: {body}");
            assert!(
                !body["errors"][0].as_str().unwrap_or("").is_empty(),
                "{body}"
            );
            refused += 1;
        } else {
            // The watcher may have loaded it first: either way it is in.
            assert_eq!(status, 200, "good version {i} refused: {body}");
            last_good = i + 2;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed requests, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(done.load(Ordering::Relaxed) >= 20_000);
    assert_eq!(refused, 5);

    // The last good version serves; the last broken one is the last error.
    std::fs::write(dir.join("main.lua"), versioned(last_good)).unwrap();
    let _ = gw.reload().await;
    let body: serde_json::Value = reqwest::Client::new()
        .get(gw.url("/probe"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["version"], last_good);
    let status = gw.rules_status().await;
    assert!(status["version"].as_u64().unwrap() >= 15, "{status}");
    assert_eq!(status["hash"].as_str().unwrap().len(), 64);
}

#[tokio::test]
async fn file_change_and_sighup_reload_and_broken_files_keep_the_old_rules() {
    let env = TestEnv::new().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lua");
    write_rules(&dir, &versioned(1), &[]);
    let mut gw = gateway(&env, &dir).await;
    let token = gw.token(3);
    let client = reqwest::Client::new();
    let version_served = || async {
        let body: serde_json::Value = client
            .get(gw.url("/probe"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["version"].as_u64().unwrap()
    };
    let wait_for = |want: u64| async move {
        for _ in 0..100 {
            if version_served().await == want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };

    // A saved file is picked up by the watcher.
    std::fs::write(dir.join("main.lua"), versioned(2)).unwrap();
    assert!(wait_for(2).await, "file change not reloaded");

    // A broken save is refused; version 2 keeps serving; last_error says why.
    std::fs::write(dir.join("main.lua"), "return { access = ").unwrap();
    let mut status = serde_json::Value::Null;
    for _ in 0..100 {
        status = gw.rules_status().await;
        if !status["last_error"].is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        status["last_error"].as_str().unwrap().contains("main.lua"),
        "{status}"
    );
    assert_eq!(version_served().await, 2);

    // SIGHUP reloads too (counted separately in metrics).
    std::fs::write(dir.join("main.lua"), versioned(3)).unwrap();
    gw.process.signal("HUP");
    assert!(wait_for(3).await, "SIGHUP/file reload did not happen");
    tokio::time::sleep(Duration::from_millis(400)).await;
    gw.process.signal("HUP");
    let mut saw_sighup = false;
    for _ in 0..40 {
        if gw.metrics().await.contains("trigger=\"sighup\"") {
            saw_sighup = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_sighup, "SIGHUP did not trigger a reload");
    assert!(
        gw.process
            .wait_exit(Duration::from_millis(10))
            .await
            .is_none(),
        "SIGHUP must not stop the gateway"
    );
}
