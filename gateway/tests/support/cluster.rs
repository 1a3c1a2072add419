//! The topology `scripts/cluster up` builds (network namespaces as hosts,
//! `deploy/cluster/seckill.toml`), as the cluster tests drive and break it:
//! the CLI against the cluster config, the gateways' metrics, who holds
//! each VIP, which Redis master owns a sale, and killing what
//! `scripts/cluster` started (each process is its own process group).
//!
//! The tests run only when `SECKILL_CLUSTER=1` (`scripts/cluster test`
//! sets it after `up`); without it each returns at once, saying so.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use seckill_contracts::config::Config;
use seckill_contracts::keys::KeySchema;
use seckill_contracts::redis_client::RedisConn;
use serde_json::Value;

use super::stack::{repo_root, sibling_binary};

/// The two gateway VIPs (keepalived), each normally on its home edge.
pub const VIPS: [&str; 2] = ["10.77.0.100", "10.77.0.101"];
/// The edges: host name and address (gateway :8080, admin :9090).
pub const EDGES: [(&str, &str); 2] = [("edge-1", "10.77.0.11"), ("edge-2", "10.77.0.12")];
const CONFIG: &str = "deploy/cluster/seckill.toml";

/// Whether the cluster tests should run here.
pub fn enabled(test: &str) -> bool {
    let on = std::env::var("SECKILL_CLUSTER").is_ok_and(|v| v == "1");
    if !on {
        eprintln!("{test}: skipped (needs SECKILL_CLUSTER=1: run scripts/cluster test)");
    }
    on
}

/// `http://VIP:8080`.
pub fn vip_url(vip: &str) -> String {
    format!("http://{vip}:8080")
}

pub struct Cluster {
    pub config: Config,
    pub keys: KeySchema,
    pub http: reqwest::Client,
    root: PathBuf,
    admin_token: String,
}

impl Cluster {
    /// Brings the topology to its normal shape (`scripts/cluster up`:
    /// starts whatever a previous test killed, puts each VIP back on its
    /// home edge) and connects to it.
    pub async fn ready() -> Cluster {
        let root = repo_root();
        let (up, out) = script(&root, &["up"]).await;
        assert!(up, "scripts/cluster up failed:\n{out}");
        let config = Config::load(Some(&root.join(CONFIG))).expect("the cluster config loads");
        let keys = KeySchema::new(config.redis.key_prefix.clone());
        let admin_token = std::fs::read_to_string(root.join("var/cluster/keys/admin-token"))
            .expect("scripts/cluster made the admin token")
            .trim()
            .to_string();
        // Longer than a rule call may take (gateway.lua_call_timeout_ms),
        // so every answer the gateway gives is seen; connecting to a dead
        // edge fails fast.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(1))
            .pool_max_idle_per_host(256)
            .build()
            .unwrap();
        for (edge, _) in EDGES {
            assert_eq!(
                vip_holder(VIPS[if edge == "edge-1" { 0 } else { 1 }]).as_deref(),
                Some(edge),
                "each VIP on its home edge after up"
            );
        }
        Cluster {
            config,
            keys,
            http,
            root,
            admin_token,
        }
    }

    /// `seckillctl --config deploy/cluster/seckill.toml ARGS` from the
    /// repository root (the config's key paths are relative to it):
    /// (success, stdout as JSON or as a string).
    pub async fn ctl(&self, args: &[&str]) -> (bool, Value) {
        let out = tokio::process::Command::new(sibling_binary("seckillctl"))
            .arg("--config")
            .arg(CONFIG)
            .args(args)
            .current_dir(&self.root)
            .env("RUST_LOG", "warn")
            .output()
            .await
            .expect("run seckillctl");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let value = serde_json::from_str(&stdout).unwrap_or_else(|_| {
            Value::String(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
        });
        (out.status.success(), value)
    }

    /// `scripts/cluster ARGS`: (success, output).
    pub async fn script(&self, args: &[&str]) -> (bool, String) {
        script(&self.root, args).await
    }

    /// A sale of `stock` units, open from now for an hour.
    pub async fn create_sale(&self, stock: u32) -> u64 {
        let stock = stock.to_string();
        let (ok, sale) = self
            .ctl(&[
                "sale",
                "create",
                "--title",
                "Cluster test",
                "--price-cents",
                "19900",
                "--sale-price-cents",
                "9900",
                "--stock",
                &stock,
            ])
            .await;
        assert!(ok, "sale create: {sale}");
        sale["id"].as_u64().expect("the new sale's id")
    }

    pub async fn redis(&self) -> RedisConn {
        RedisConn::connect(&self.config.redis)
            .await
            .expect("the Redis cluster answers")
    }

    /// `ip:port` of the Redis master that owns the sale's slot (all of a
    /// sale's keys share one hash tag, so one slot).
    /// Asks the seeds in turn (one may be the node a test killed); `None`
    /// while the slot has no live master.
    pub async fn master_of(&self, sale_id: u64) -> Option<String> {
        for seed in self.config.redis.nodes() {
            let Ok(client) = redis::Client::open(seed.as_str()) else {
                continue;
            };
            let connect = client.get_multiplexed_async_connection();
            let Ok(Ok(mut conn)) = tokio::time::timeout(Duration::from_millis(500), connect).await
            else {
                continue;
            };
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(self.keys.sale(sale_id).stock())
                .query_async(&mut conn)
                .await
                .ok()?;
            let nodes: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut conn)
                .await
                .ok()?;
            return master_of_slot(&nodes, slot);
        }
        None
    }

    /// The edge's gateway metrics (`/metrics` on its admin listener).
    pub async fn metrics(&self, edge: usize) -> String {
        let url = format!("http://{}:9090/metrics", EDGES[edge].1);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(resp.status(), 200, "{url}");
        resp.text().await.unwrap()
    }

    /// Tokens for users `first..first + count` (`seckillctl token`).
    pub async fn tokens(&self, first: u64, count: u64) -> Vec<String> {
        let (first, count) = (first.to_string(), count.to_string());
        let (ok, out) = self
            .ctl(&["token", "--user-id", &first, "--count", &count])
            .await;
        assert!(ok, "seckillctl token: {out}");
        // One token per line is not JSON: `ctl` hands it back as a string.
        let text = out.as_str().unwrap_or_default();
        text.lines().map(str::to_string).collect()
    }

    /// Hidden paths for `users`, written to Redis as the api does after a
    /// right captcha answer (the herd test goes through the api instead).
    pub async fn issue_paths(&self, sale_id: u64, users: &[u64]) -> HashMap<u64, String> {
        let mut redis = self.redis().await;
        let mut paths = HashMap::new();
        for &user in users {
            let path = format!("{:032x}", uuid::Uuid::new_v4().as_u128());
            let _: () = redis::cmd("SET")
                .arg(self.keys.sale(sale_id).path(user))
                .arg(&path)
                .arg("EX")
                .arg(600)
                .query_async(&mut redis)
                .await
                .unwrap();
            paths.insert(user, path);
        }
        paths
    }

    /// `seckillctl audit --sale N`, repeated until it is clean and quiet
    /// (nothing in flight) or `limit` passes; the last report.
    pub async fn audit_until_clean(&self, sale_id: u64, limit: Duration) -> (bool, Value) {
        let deadline = Instant::now() + limit;
        let id = sale_id.to_string();
        loop {
            let (ok, report) = self.ctl(&["audit", "--sale", &id]).await;
            if (ok && report["quiet"] == true) || Instant::now() > deadline {
                return (ok, report);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// `seckillctl audit --sale N` once nothing is in flight (queue
    /// drained, no reservation open), clean or not, or after `limit`.
    pub async fn audit_when_quiet(&self, sale_id: u64, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        let id = sale_id.to_string();
        loop {
            let (_, report) = self.ctl(&["audit", "--sale", &id]).await;
            if report["quiet"] == true || Instant::now() > deadline {
                return report;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The sale's Redis stock counter.
    pub async fn redis_stock(&self, sale_id: u64) -> i64 {
        let mut redis = self.redis().await;
        redis::cmd("GET")
            .arg(self.keys.sale(sale_id).stock())
            .query_async::<Option<i64>>(&mut redis)
            .await
            .unwrap()
            .unwrap_or(-1)
    }
}

/// `scripts/cluster ARGS` from the repository root `root`, with the
/// binaries it runs (`SECKILL_BIN_DIR`, release by default): (success,
/// output).
async fn script(root: &Path, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(root.join("scripts/cluster"))
        .args(args)
        .current_dir(root)
        .output()
        .await
        .expect("run scripts/cluster");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The edge whose `eth0` carries `vip`, if any (an edge killed with
/// `kill -9` keeps the address on its interface but is not the holder once
/// the other edge took over: the other edge is asked first in that case).
pub fn vip_holder(vip: &str) -> Option<String> {
    let mut holders: Vec<String> = EDGES
        .iter()
        .filter(|(edge, _)| {
            let out = std::process::Command::new("ip")
                .args([
                    "-n",
                    &format!("sk-{edge}"),
                    "-4",
                    "addr",
                    "show",
                    "dev",
                    "eth0",
                ])
                .output()
                .expect("run ip");
            String::from_utf8_lossy(&out.stdout).contains(&format!(" {vip}/"))
        })
        .map(|(edge, _)| edge.to_string())
        .collect();
    match holders.len() {
        0 => None,
        1 => holders.pop(),
        // Both carry it: the one whose keepalived is alive is the holder.
        _ => holders.into_iter().find(|edge| {
            let vip_index = VIPS.iter().position(|v| *v == vip).unwrap_or(0) + 1;
            process_alive(&format!("keepalived-{edge}-vip{vip_index}"))
        }),
    }
}

/// Whether `var/cluster/run/NAME.pid` names a live process.
pub fn process_alive(name: &str) -> bool {
    pid_of(name).is_some_and(|pid| {
        std::process::Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn pid_of(name: &str) -> Option<u32> {
    let file = repo_root().join(format!("var/cluster/run/{name}.pid"));
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// `kill -9` of what `scripts/cluster` started as NAME, with its children
/// (its process group).
pub fn kill_9(name: &str) {
    signal(name, "9");
}

/// `kill -SIG` to what `scripts/cluster` started as NAME (its process
/// group), e.g. `STOP` and `CONT` to freeze and thaw it.
pub fn signal(name: &str, sig: &str) {
    let pid = pid_of(name).unwrap_or_else(|| panic!("no pid file for {name}"));
    let status = std::process::Command::new("kill")
        .args([&format!("-{sig}"), "--", &format!("-{pid}")])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {name}");
}

/// Takes HOST's only link (`eth0` in its namespace) down or up: the host
/// drops off the network with everything on it still running.
/// `scripts/cluster up` brings every link up again.
pub fn set_link(host: &str, up: bool) {
    let state = if up { "up" } else { "down" };
    let status = std::process::Command::new("ip")
        .args(["-n", &format!("sk-{host}"), "link", "set", "eth0", state])
        .status()
        .expect("run ip");
    assert!(status.success(), "ip link set eth0 {state} in {host}");
}

/// The master owning `slot` in a `CLUSTER NODES` reply.
pub fn master_of_slot(nodes: &str, slot: u16) -> Option<String> {
    nodes.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A master another node marked failed no longer counts.
        if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
            return None;
        }
        let owns = fields[8..].iter().any(|range| {
            let mut ends = range.split('-').map(|n| n.parse::<u16>().ok());
            match (ends.next().flatten(), ends.next().flatten()) {
                (Some(a), Some(b)) => (a..=b).contains(&slot),
                (Some(a), None) => a == slot,
                _ => false,
            }
        });
        owns.then(|| fields[1].split('@').next().unwrap_or_default().to_string())
    })
}

/// The sum of every sample of metric `name` whose labels contain all of
/// `labels` (e.g. `route="seckill"`), in Prometheus text.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
