//! The OpenResty peer (`bench/peers/openresty/`): nginx + lua-nginx-module
//! running the same admission against the same Redis, started on the bench
//! stack's config so the same buyers' tokens and paths work on both, and
//! measured the same way (wrk, and the CPU its processes use from `/proc`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context};

/// Where the peer listens (the bench stack's ports are in bench/bench.toml).
pub const PEER_PORT: u16 = 18181;
/// nginx `return 410` with one worker: the floor of any nginx edge.
pub const FLOOR_PORT: u16 = 18191;
/// `pingora-floor` (bench/src/bin/pingora_floor.rs): the floor of any
/// Pingora edge.
pub const PINGORA_FLOOR_PORT: u16 = 18192;

/// The bare Pingora app, started from the bench's release binaries;
/// killed on drop.
pub struct PingoraFloor {
    child: Child,
    pub url: String,
}

impl PingoraFloor {
    pub async fn start(bin_dir: &Path, threads: usize) -> anyhow::Result<PingoraFloor> {
        let listen = format!("127.0.0.1:{PINGORA_FLOOR_PORT}");
        let child = Command::new(bin_dir.join("pingora-floor"))
            .arg(&listen)
            .arg(threads.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting pingora-floor")?;
        let floor = PingoraFloor {
            child,
            url: format!("http://{listen}/"),
        };
        wait_answering(&floor.url).await?;
        Ok(floor)
    }

    /// CPU time the process has used.
    pub fn cpu_time(&self) -> Duration {
        crate::stack::process_cpu_time(self.child.id())
    }
}

impl Drop for PingoraFloor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running peer; stopped on drop.
pub struct Peer {
    var: PathBuf,
    pub url: String,
}

impl Peer {
    /// Starts the peer on `config` (the bench stack's TOML), its files
    /// under `var`, and waits until it answers.
    pub async fn start(config: &Path, var: &Path) -> anyhow::Result<Peer> {
        std::fs::create_dir_all(var)?;
        let var = &std::fs::canonicalize(var)?;
        let out = Command::new("bench/peers/openresty/run")
            .arg("start")
            .args(["--port", &PEER_PORT.to_string()])
            .arg("--var")
            .arg(var)
            .arg("--config")
            .arg(config)
            .output()
            .context("running bench/peers/openresty/run start")?;
        if !out.status.success() {
            bail!(
                "the OpenResty peer did not start:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let peer = Peer {
            var: var.to_path_buf(),
            url: format!("http://127.0.0.1:{PEER_PORT}"),
        };
        // Any answer means nginx is up (the route answers 404 to a GET /).
        wait_answering(&peer.url).await?;
        Ok(peer)
    }

    /// CPU time its nginx processes (master and workers) have used.
    pub fn cpu_time(&self) -> Duration {
        nginx_cpu_time(&self.var.join("nginx.pid"))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = Command::new("bench/peers/openresty/run")
            .arg("stop")
            .arg("--var")
            .arg(&self.var)
            .status();
    }
}

/// An nginx of the bench's own: `conf` rendered into `dir` (its pid file
/// `dir/nginx.pid`), stopped (QUIT) on drop.
pub struct Nginx {
    child: Child,
    pub pid_file: PathBuf,
}

impl Nginx {
    /// Starts it and waits until `url` answers anything.
    pub async fn start(dir: &Path, conf: &str, url: &str) -> anyhow::Result<Nginx> {
        std::fs::create_dir_all(dir)?;
        let dir = std::fs::canonicalize(dir)?;
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf.replace("__VAR__", &dir.to_string_lossy()))?;
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(&dir)
            .spawn()
            .context("starting nginx (is nginx-light installed?)")?;
        let nginx = Nginx {
            child,
            pid_file: dir.join("nginx.pid"),
        };
        wait_answering(url).await?;
        Ok(nginx)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-QUIT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// Waits up to 10 s until `url` answers with any status.
async fn wait_answering(url: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while reqwest::get(url).await.is_err() {
        if std::time::Instant::now() > deadline {
            bail!("nothing answered on {url}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// CPU time of the nginx whose master's pid is in `pid_file`, and of its
/// children (the workers), from `/proc/<pid>/stat`.
pub fn nginx_cpu_time(pid_file: &Path) -> Duration {
    let Some(master) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return Duration::ZERO;
    };
    let mut pids = vec![master];
    if let Ok(out) = Command::new("pgrep")
        .args(["-P", &master.to_string()])
        .output()
    {
        pids.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.trim().parse::<u32>().ok()),
        );
    }
    pids.into_iter().map(crate::stack::process_cpu_time).sum()
}
