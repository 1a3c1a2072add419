//! Rules bundles across a fleet, through real gateways and the real CLI:
//! three gateways follow the bundles while callers hammer a rule-answered
//! route; `seckillctl rules push` switches all of them or none; a bundle
//! one gateway refuses (its selftest overruns that gateway's smaller
//! instruction budget) is refused everywhere with that gateway's error; a
//! gateway started after a push serves the active bundle from its first
//! request; `rules rollback` returns every gateway to the previous bundle.
//! No request fails at any point, and no gateway ever runs a refused bundle.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use seckill_contracts::config::{Config, RouteConfig};
use seckill_contracts::testkit::TestEnv;
use serde_json::Value;
use support::stack::seckillctl;
use support::{write_rules, GatewayProc};

/// A rule set answering `/probe` with its version.
fn versioned(v: u32, selftest_loops: u32) -> String {
    format!(
        r#"
local VERSION = {v}
return {{
  access = function(req)
    return seckill.respond(200, {{ version = VERSION }})
  end,
  selftest = function()
    local n = 0
    for i = 1, {selftest_loops} do n = n + i end
    return n >= 0
  end,
}}
"#
    )
}

fn gateway_config(env: &TestEnv, rules: &Path, id: &str, budget: u64) -> Config {
    let mut config = GatewayProc::config(env, &[], rules);
    config.gateway.pools.clear();
    config.gateway.routes = vec![RouteConfig {
        public: true,
        ..RouteConfig::local("probe", "GET", "/probe")
    }];
    config.gateway.bundles.enabled = true;
    config.gateway.bundles.poll_ms = 100;
    config.gateway.bundles.id = id.into();
    config.gateway.lua_instruction_budget = budget;
    config
}

async fn probe(http: &reqwest::Client, gw: &GatewayProc) -> Result<u64, String> {
    let resp = http
        .get(gw.url("/probe"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body: Value = resp.json().await.map_err(|e| e.to_string())?;
    match body["version"].as_u64() {
        Some(v) if status == 200 => Ok(v),
        _ => Err(format!("{status}: {body}")),
    }
}

/// Callers spread over the gateways (a shared, growing list), counting the
/// rule versions they saw and every failure.
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<BTreeMap<u64, u64>>>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(gateways: Arc<Mutex<Vec<Arc<GatewayProc>>>>, callers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..callers)
            .map(|c| {
                let (stop, seen, failures, gateways) = (
                    stop.clone(),
                    seen.clone(),
                    failures.clone(),
                    gateways.clone(),
                );
                tokio::spawn(async move {
                    let http = reqwest::Client::new();
                    let mut n = c;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let gw = {
                            let g = gateways.lock().unwrap();
                            g[n % g.len()].clone()
                        };
                        match probe(&http, &gw).await {
                            Ok(v) => *seen.lock().unwrap().entry(v).or_default() += 1,
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            seen,
            failures,
            tasks,
        }
    }

    fn total(&self) -> u64 {
        self.seen.lock().unwrap().values().sum()
    }
}

/// `seckillctl --config <gw0> rules ...` → (exit ok, JSON).
async fn ctl(config: &Path, args: &[&str]) -> (bool, Value) {
    let mut full = vec!["rules"];
    full.extend_from_slice(args);
    seckillctl(config, &full).await
}

async fn versions(http: &reqwest::Client, gateways: &Mutex<Vec<Arc<GatewayProc>>>) -> Vec<u64> {
    let all: Vec<_> = gateways.lock().unwrap().clone();
    let mut out = Vec::new();
    for gw in all {
        out.push(probe(http, &gw).await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bundles_switch_every_gateway_or_none_under_load() {
    let env = TestEnv::new().await;
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("lua");
    write_rules(&local, &versioned(1, 10), &[]);
    let mut started = Vec::new();
    for (i, budget) in [1_000_000, 1_000_000, 200_000].into_iter().enumerate() {
        let config = gateway_config(&env, &local, &format!("gw-{i}"), budget);
        started.push(Arc::new(GatewayProc::start(config).await));
    }
    let ctl_config = started[0].config_path.clone();
    let gateways = Arc::new(Mutex::new(started));
    let http = reqwest::Client::new();
    assert_eq!(
        versions(&http, &gateways).await,
        [1, 1, 1],
        "the local folder first"
    );
    let load = Load::start(gateways.clone(), 12);

    // Push A: every gateway switches before the push returns.
    let bundle = |name: &str, v: u32, loops: u32| {
        let dir = tmp.path().join(name);
        write_rules(&dir, &versioned(v, loops), &[]);
        dir
    };
    let a = bundle("a", 10, 10);
    let t = Instant::now();
    let (ok, pushed) = ctl(&ctl_config, &["push", a.to_str().unwrap()]).await;
    assert!(ok, "{pushed}");
    let push_ms = t.elapsed().as_millis();
    assert_eq!(pushed["gateways"].as_array().unwrap().len(), 3, "{pushed}");
    assert_eq!(versions(&http, &gateways).await, [10, 10, 10]);
    let a_version = pushed["version"].as_u64().unwrap();
    let (ok, again) = ctl(&ctl_config, &["push", a.to_str().unwrap()]).await;
    assert!(
        ok && again["changed"] == false,
        "same content is no new version: {again}"
    );

    // A bundle gw-2's smaller budget refuses: refused by all.
    let heavy = bundle("heavy", 30, 150_000);
    let (ok, refused) = ctl(&ctl_config, &["push", heavy.to_str().unwrap()]).await;
    assert!(!ok, "{refused}");
    let refusals = refused["refusals"].as_array().unwrap();
    assert_eq!(refusals.len(), 1, "{refused}");
    assert_eq!(refusals[0]["gateway"], "gw-2");
    assert!(
        refusals[0]["error"]
            .as_str()
            .unwrap()
            .contains("instruction"),
        "{refused}"
    );
    assert_eq!(versions(&http, &gateways).await, [10, 10, 10]);
    let (_, status) = ctl(&ctl_config, &["status"]).await;
    assert_eq!(status["active"], a_version, "{status}");

    println!("bundles: push A in {push_ms} ms, heavy refused by gw-2");
    // A gateway started now serves A from its first request.
    let late = gateway_config(&env, &local, "gw-3", 1_000_000);
    let late = Arc::new(GatewayProc::start(late).await);
    assert_eq!(probe(&http, &late).await.unwrap(), 10);
    gateways.lock().unwrap().push(late);

    // Push B, then roll back to A, under load.
    let b = bundle("b", 20, 10);
    let (ok, pushed) = ctl(&ctl_config, &["push", b.to_str().unwrap()]).await;
    assert!(ok, "{pushed}");
    assert_eq!(versions(&http, &gateways).await, [20, 20, 20, 20]);
    let (ok, back) = ctl(&ctl_config, &["rollback"]).await;
    assert!(ok, "{back}");
    assert_eq!(back["version"], a_version);
    assert_eq!(versions(&http, &gateways).await, [10, 10, 10, 10]);
    let (_, status) = ctl(&ctl_config, &["status"]).await;
    for gw in status["gateways"].as_array().unwrap() {
        assert_eq!(gw["version"], a_version, "{status}");
        assert_eq!(gw["live"], true);
    }

    // A local reload is refused while bundles are the source.
    let first = gateways.lock().unwrap()[0].clone();
    let (code, _) = first.reload().await;
    assert_eq!(code, 409);

    let deadline = Instant::now() + Duration::from_secs(60);
    while load.total() < 20_000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    load.stop.store(true, Ordering::Relaxed);
    for t in load.tasks {
        t.await.unwrap();
    }
    let seen = load.seen.lock().unwrap().clone();
    let failures = load.failures.lock().unwrap().clone();
    println!(
        "bundles: {seen:?} answers by version, {} failed; first push {push_ms} ms",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{:?}",
        &failures[..failures.len().min(5)]
    );
    assert!(seen.values().sum::<u64>() >= 20_000, "{seen:?}");
    assert!(
        !seen.contains_key(&30),
        "a refused bundle never served: {seen:?}"
    );
    drop(gateways);
    env.cleanup().await;
}
