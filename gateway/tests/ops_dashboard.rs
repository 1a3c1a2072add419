//! The `/ops` dashboard's data through the real gateway, two apis and a
//! worker: after a sell-out its figures are exactly what the buyers were
//! answered (admissions = stock, every 410 counted as sold out, shortcut
//! replays included), every process is listed live, and its actions work:
//! a broken rule is refused by the gateway with its compile error while the
//! old version keeps serving, and the audit is clean.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::stack::{Stack, StackOptions, ADMIN_TOKEN};

const STOCK: u64 = 5;
const BUYERS: u64 = 30;

async fn ops(stack: &Stack, method: &str, path: &str, token: &str) -> (u16, Value) {
    let url = stack.url(&format!("/ops/api{path}"));
    let req = match method {
        "POST" => stack.http.post(url),
        _ => stack.http.get(url),
    };
    let resp = req.bearer_auth(token).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The sale's figures once `done` holds (reports are written every second).
async fn figures_when(stack: &Stack, sale: u64, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, f) = ops(stack, "GET", &format!("/sales/{sale}"), ADMIN_TOKEN).await;
        assert_eq!(status, 200, "{f}");
        if done(&f) {
            return f;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "figures never settled: {f:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_dashboard_figures_match_what_buyers_were_answered() {
    let stack = Stack::start(StackOptions {
        worker: true,
        gateway_amqp_url: None,
        gateway_redis_url: None,
        payment_mode: None,
    })
    .await;
    let sale = stack.create_sale(STOCK as u32, -1, 3600).await;

    // The data is behind the admin token, and bad ids are 404s.
    assert_eq!(
        ops(&stack, "GET", &format!("/sales/{sale}"), "nope")
            .await
            .0,
        401
    );
    assert_eq!(
        ops(&stack, "GET", "/sales/999999", ADMIN_TOKEN).await.0,
        404
    );
    assert_eq!(
        ops(&stack, "GET", "/sales/1%20OR%201=1", ADMIN_TOKEN)
            .await
            .0,
        404
    );

    let mut answered = std::collections::BTreeMap::<u16, u64>::new();
    for user in 1..=BUYERS {
        let path = stack.issue_path(sale, user).await;
        let (status, _, _) = stack.seckill(user, &path, sale).await;
        *answered.entry(status).or_default() += 1;
    }
    assert_eq!(answered.get(&202), Some(&STOCK), "{answered:?}");
    let sold_out = answered.get(&410).copied().unwrap_or(0);
    assert_eq!(sold_out, BUYERS - STOCK, "{answered:?}");

    let f = figures_when(&stack, sale, |f| {
        f["orders"]["committed"] == STOCK && f["refusals"]["sold_out"] == sold_out
    })
    .await;
    assert_eq!(f["admissions"], STOCK, "{f:#}");
    assert_eq!(f["stock_left"], 0);
    assert_eq!(f["orders"]["unpaid"], STOCK);
    assert_eq!(f["queue"]["orders"], 0);
    assert!(f["latency_ms"]["publish_confirm"]["count"].as_u64() >= Some(STOCK));
    assert!(f["latency_ms"]["end_to_end"]["count"].as_u64() >= Some(STOCK));
    assert!(f["latency_ms"]["end_to_end"]["p99"].as_f64().is_some());
    let refused: u64 = f["refusals"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(refused, sold_out, "nothing else was refused: {f:#}");
    for (role, n) in [("gateway", 1), ("api", 2), ("worker", 1)] {
        let live = f["processes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["role"] == role && p["live"] == true && p["healthy"] == true)
            .count();
        assert_eq!(live, n, "{role}: {:#}", f["processes"]);
    }
    let metrics = stack.gateway.metrics().await;
    assert!(
        metrics.contains(&format!(
            "gateway_admission_decisions_total{{outcome=\"queued\"}} {STOCK}"
        )),
        "{metrics}"
    );

    // A broken rule: refused by the gateway, its error shown, the old
    // version keeps serving.
    let version = f["processes"][0]["rules"]["version"].clone();
    let rule = stack.config.gateway.rules_dir.join("seckill.lua");
    let good = std::fs::read_to_string(&rule).unwrap();
    std::fs::write(&rule, format!("{good}\nthis is not lua (\n")).unwrap();
    let (status, body) = ops(&stack, "POST", "/rules/reload", ADMIN_TOKEN).await;
    assert_eq!(status, 422, "{body:#}");
    assert_eq!(body["ok"], false);
    let answer = &body["gateways"][0];
    assert_eq!(answer["status"], 422);
    assert!(
        answer["body"]["errors"][0]
            .as_str()
            .unwrap()
            .contains("seckill.lua"),
        "{answer:#}"
    );
    assert_eq!(answer["body"]["serving"]["version"], version);
    let path = stack.issue_path(sale, BUYERS + 1).await;
    let (status, _, _) = stack.seckill(BUYERS + 1, &path, sale).await;
    assert_eq!(status, 410, "the old rules still answer");
    std::fs::write(&rule, good).unwrap();
    let (status, body) = ops(&stack, "POST", "/rules/reload", ADMIN_TOKEN).await;
    assert_eq!(status, 200, "{body:#}");

    let (status, audit) = ops(&stack, "POST", &format!("/sales/{sale}/audit"), ADMIN_TOKEN).await;
    assert_eq!(status, 200, "{audit:#}");
    assert_eq!(audit["ok"], true, "{audit:#}");
    let (status, replay) = ops(&stack, "POST", "/dlq/replay", ADMIN_TOKEN).await;
    assert_eq!((status, &replay["replayed"]), (200, &Value::from(0)));
    stack.cleanup().await;
}

/// The Grafana dashboard (deploy/grafana) queries only series the code
/// registers: a renamed metric must not leave a silently empty panel.
#[test]
fn every_series_the_grafana_dashboard_queries_is_registered() {
    let root = support::stack::repo_root();
    let dashboard = std::fs::read_to_string(root.join("deploy/grafana/seckill-sale.json")).unwrap();
    let mut sources = String::new();
    for dir in ["gateway/src", "workers/src", "contracts/src"] {
        collect_rust(&root.join(dir), &mut sources);
    }
    let names: std::collections::BTreeSet<String> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("gateway_") || w.starts_with("seckill_"))
        .map(|w| {
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| w.strip_suffix(s))
                .unwrap_or(w);
            base.to_string()
        })
        .collect();
    assert!(names.len() > 10, "{names:?}");
    for name in names {
        assert!(
            sources.contains(&format!("\"{name}\"")),
            "the Grafana dashboard queries {name}, which no code registers"
        );
    }
}

fn collect_rust(dir: &std::path::Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_rust(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
}
