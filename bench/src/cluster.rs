//! The scale-out topology of `scripts/cluster` (SPEC §6: two gateways
//! behind two keepalived VIPs, Redis Cluster, a RabbitMQ cluster, two api
//! and worker hosts, each "host" a network namespace) as `bench/run
//! --cluster` uses it: made ready before the load, its gateways' pids for
//! their CPU and their admin listeners for their metrics.
//!
//! ```text
//! Topology::ready   every process scripts/cluster started alive, each VIP
//!                   on its home edge and answering? else `scripts/cluster
//!                   up` (root); then, when a product process runs an
//!                   older build than bench/run just made, `scripts/cluster
//!                   restart`, so both sides measure the same code
//! ```
//!
//! The topology is left running afterwards: it takes minutes to build, and
//! the failover tests use the same one.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use seckill_contracts::config::{read_secret, Config};

/// The topology's config (relative to the repository root).
pub const CONFIG: &str = "deploy/cluster/seckill.toml";
/// Where `scripts/cluster` keeps the pid file of each process it started.
const RUN_DIR: &str = "var/cluster/run";
/// The two gateway VIPs; VIP i is at home on edge i.
pub const VIPS: [&str; 2] = ["10.77.0.100", "10.77.0.101"];
/// The edges: host name and address.
pub const EDGES: [(&str, &str); 2] = [("edge-1", "10.77.0.11"), ("edge-2", "10.77.0.12")];

/// The running topology, ready for load.
pub struct Topology {
    pub config: Config,
    pub config_path: PathBuf,
    pub admin_token: String,
}

impl Topology {
    /// Brings the topology up when it is not (or not in its normal shape),
    /// restarts its product processes when `bin_dir` holds a newer build,
    /// and loads its config. `log` receives `scripts/cluster`'s output.
    pub async fn ready(config_path: &Path, bin_dir: &Path, log: &Path) -> anyhow::Result<Topology> {
        let config = Config::load(Some(config_path)).context("loading the cluster config")?;
        let port = config.gateway.listen.port();
        if let Err(why) = healthy(port).await {
            eprintln!("[bench] the cluster topology is not ready ({why:#}): scripts/cluster up");
            script(&["up"], bin_dir, log)?;
            healthy(port).await.context("after scripts/cluster up")?;
        }
        if let Some(stale) = stale_process(bin_dir) {
            eprintln!("[bench] {stale} runs an older build: scripts/cluster restart");
            script(&["restart"], bin_dir, log)?;
            healthy(port)
                .await
                .context("after scripts/cluster restart")?;
        }
        // Made by `scripts/cluster up`, so read after it.
        let admin_token = read_secret(
            "gateway.admin_token",
            config.gateway.admin_token.as_deref(),
            config.gateway.admin_token_path.as_deref(),
        )?;
        Ok(Topology {
            config,
            config_path: config_path.to_path_buf(),
            admin_token,
        })
    }

    /// `http://VIP:port/` of both VIPs, one per wrk.
    pub fn vip_urls(&self) -> Vec<String> {
        let port = self.config.gateway.listen.port();
        VIPS.iter().map(|v| format!("http://{v}:{port}/")).collect()
    }

    /// Each edge gateway's `/metrics` (its admin listener).
    pub fn metrics_urls(&self) -> Vec<String> {
        let port = self.config.gateway.admin_listen.port();
        EDGES
            .iter()
            .map(|(_, ip)| format!("http://{ip}:{port}/metrics"))
            .collect()
    }

    /// The pids of both edges' gateways (from `scripts/cluster`'s pid
    /// files; checked to be a live `seckill-gateway`).
    pub fn gateway_pids(&self) -> anyhow::Result<Vec<u32>> {
        EDGES
            .iter()
            .map(|(edge, _)| {
                let name = format!("gateway-{edge}");
                let pid = pid_of(&name).with_context(|| format!("no live {name}"))?;
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))?;
                if !comm.trim().starts_with("seckill-gatewa") {
                    bail!("{name}'s pid {pid} is `{}`, not the gateway", comm.trim());
                }
                Ok(pid)
            })
            .collect()
    }
}

/// Ok when every process `scripts/cluster` started is alive, each VIP is
/// on its home edge alone and every gateway answers `/healthz` on `port`,
/// directly and through its VIP: a VIP that moved would put both wrks on
/// one gateway.
async fn healthy(port: u16) -> anyhow::Result<()> {
    let names = pid_files()?;
    if names.is_empty() {
        bail!("nothing started by scripts/cluster");
    }
    for name in &names {
        if pid_of(name).is_none() {
            bail!("{name} is not running");
        }
    }
    for (i, vip) in VIPS.iter().enumerate() {
        let holders: Vec<&str> = EDGES
            .iter()
            .map(|(edge, _)| *edge)
            .filter(|edge| carries(edge, vip))
            .collect();
        if holders != [EDGES[i].0] {
            bail!("VIP {vip} is on {holders:?}, not on {} alone", EDGES[i].0);
        }
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .no_proxy()
        .build()?;
    let hosts = VIPS.iter().chain(EDGES.iter().map(|(_, ip)| ip));
    for host in hosts {
        let url = format!("http://{host}:{port}/healthz");
        let ok = http
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if !ok {
            bail!("{url} does not answer 200");
        }
    }
    Ok(())
}

/// Whether `vip` is on `edge`'s interface.
fn carries(edge: &str, vip: &str) -> bool {
    Command::new("ip")
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
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {vip}/")))
}

/// The names of `var/cluster/run/*.pid`.
fn pid_files() -> anyhow::Result<Vec<String>> {
    let Ok(dir) = std::fs::read_dir(RUN_DIR) else {
        return Ok(Vec::new());
    };
    let mut names = Vec::new();
    for entry in dir {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "pid") {
            if let Some(stem) = path.file_stem() {
                names.push(stem.to_string_lossy().into_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// The live pid in `var/cluster/run/NAME.pid`.
fn pid_of(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(Path::new(RUN_DIR).join(format!("{name}.pid"))).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// The first product process (api, worker, gateway) started before its
/// binary in `bin_dir` was last built, as `scripts/cluster test` checks.
fn stale_process(bin_dir: &Path) -> Option<String> {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    pid_files().ok()?.into_iter().find(|name| {
        let Some(role) = ["api", "worker", "gateway"]
            .into_iter()
            .find(|r| name.starts_with(&format!("{r}-")))
        else {
            return false;
        };
        let built = modified(&bin_dir.join(format!("seckill-{role}")));
        let started = modified(&Path::new(RUN_DIR).join(format!("{name}.pid")));
        is_newer(built, started)
    })
}

/// Whether `a` is known and later than `b` (an unknown `b` counts as older).
fn is_newer(a: Option<SystemTime>, b: Option<SystemTime>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a > b,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// `scripts/cluster ARGS` with the bench's binaries, its output appended
/// to `log`.
fn script(args: &[&str], bin_dir: &Path, log: &Path) -> anyhow::Result<()> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let status = Command::new("scripts/cluster")
        .args(args)
        .env("SECKILL_BIN_DIR", bin_dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .context("running scripts/cluster")?;
    if !status.success() {
        bail!(
            "scripts/cluster {} failed (it needs root); see {}",
            args.join(" "),
            log.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_stale_only_when_its_binary_is_known_newer() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let later = t + Duration::from_secs(1);
        assert!(is_newer(Some(later), Some(t)));
        assert!(!is_newer(Some(t), Some(later)));
        assert!(!is_newer(Some(t), Some(t)));
        assert!(is_newer(Some(t), None));
        assert!(!is_newer(None, Some(t)));
    }
}
