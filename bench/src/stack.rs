//! Starts and stops the bench stack: the release `seckill-gateway`, two
//! `seckill-api`, the `seckill-worker`s and a `seckill-wallet` on
//! `bench/bench.toml`, after resetting the bench's own databases, key
//! prefix and queues.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use seckill_contracts::config::{read_secret, Config};

/// The running bench processes; stopped (SIGTERM, then kill) on drop.
pub struct BenchStack {
    pub config: Config,
    pub config_path: PathBuf,
    pub bin_dir: PathBuf,
    pub admin_token: String,
    pub log_dir: PathBuf,
    procs: Vec<(String, Child)>,
}

impl BenchStack {
    /// Resets the bench data and starts every process; waits until each
    /// answers `/healthz`.
    pub async fn start(
        config_path: &Path,
        bin_dir: &Path,
        log_dir: &Path,
        workers: usize,
    ) -> anyhow::Result<BenchStack> {
        let config = Config::load(Some(config_path)).context("loading the bench config")?;
        std::fs::create_dir_all(log_dir)?;
        let admin_token = read_secret(
            "gateway.admin_token",
            config.gateway.admin_token.as_deref(),
            config.gateway.admin_token_path.as_deref(),
        )?;
        let mut stack = BenchStack {
            config,
            config_path: config_path.to_path_buf(),
            bin_dir: bin_dir.to_path_buf(),
            admin_token,
            log_dir: log_dir.to_path_buf(),
            procs: Vec::new(),
        };
        stack.reset().await?;
        let pool = stack.api_addrs()?;
        let wallet = stack.config.wallet.listen.to_string();
        let worker_addrs: Vec<String> = (0..workers).map(|i| stack.worker_addr(i)).collect();
        let gateway = &stack.config.gateway;
        for addr in pool.iter().chain(&worker_addrs).cloned().chain([
            wallet.clone(),
            gateway.listen.to_string(),
            gateway.admin_listen.to_string(),
        ]) {
            ensure_free(&addr)?;
        }
        stack.spawn("wallet", "seckill-wallet", &["--listen", &wallet], &[])?;
        wait_ok(&format!("http://{wallet}/healthz"), Duration::from_secs(60)).await?;
        for (i, addr) in pool.iter().enumerate() {
            stack.spawn(&format!("api-{i}"), "seckill-api", &["--listen", addr], &[])?;
        }
        let mut worker_health = Vec::new();
        for (i, addr) in worker_addrs.iter().enumerate() {
            stack.spawn(
                &format!("worker-{i}"),
                "seckill-worker",
                &["--listen", addr],
                &[],
            )?;
            worker_health.push(format!("http://{addr}/healthz"));
        }
        stack.spawn("gateway", "seckill-gateway", &[], &[])?;
        let mut health: Vec<String> = pool.iter().map(|a| format!("http://{a}/healthz")).collect();
        health.extend(worker_health);
        health.push(format!("http://{}/healthz", stack.config.gateway.listen));
        for url in health {
            wait_ok(&url, Duration::from_secs(60))
                .await
                .with_context(|| {
                    format!("{url} never became healthy (logs in {})", log_dir.display())
                })?;
        }
        Ok(stack)
    }

    /// Drops and re-migrates the bench database, deletes the bench key
    /// prefix and purges the bench queues, so runs never see each other.
    async fn reset(&self) -> anyhow::Result<()> {
        let db_url = &self.config.database.url;
        let (server, name) = db_url
            .rsplit_once('/')
            .context("database.url needs a database name")?;
        if !name.contains("bench") {
            bail!(
                "refusing to reset database `{name}`: the bench database name must contain `bench`"
            );
        }
        if !self.config.redis.key_prefix.contains("bench") {
            bail!("refusing to reset the key prefix: it must contain `bench`");
        }
        let wallet_db = self
            .config
            .wallet
            .database_url
            .rsplit_once('/')
            .map(|(_, n)| n.to_string())
            .unwrap_or_default();
        if !wallet_db.contains("bench") {
            bail!("refusing to reset database `{wallet_db}`: the bench wallet database name must contain `bench`");
        }
        let admin = sqlx::MySqlPool::connect(&format!("{server}/")).await?;
        for db in [name, wallet_db.as_str()] {
            sqlx::query(&format!("DROP DATABASE IF EXISTS `{db}`"))
                .execute(&admin)
                .await?;
        }
        admin.close().await;
        self.ctl(&["migrate"])?;
        let mut redis = seckill_workers::connections::redis(&self.config).await?;
        let pattern = format!("{}:*", self.config.redis.key_prefix);
        loop {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query_async(&mut redis)
                .await?;
            if keys.is_empty() {
                break;
            }
            for chunk in keys.chunks(1000) {
                let _: () = redis::cmd("DEL").arg(chunk).query_async(&mut redis).await?;
            }
        }
        purge_queues(&self.config).await?;
        Ok(())
    }

    /// Runs `seckillctl` on the bench config; returns its stdout.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(self.bin_dir.join("seckillctl"))
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .context("running seckillctl")?;
        if !out.status.success() {
            bail!(
                "seckillctl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn spawn(
        &mut self,
        name: &str,
        bin: &str,
        args: &[&str],
        env: &[(String, String)],
    ) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_dir.join(format!("{name}.log")))?;
        let child = Command::new(self.bin_dir.join(bin))
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        self.procs.push((name.to_string(), child));
        Ok(())
    }

    /// Stops the processes whose name starts with `prefix` (SIGTERM).
    pub fn stop_matching(&mut self, prefix: &str) {
        let (stop, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.procs)
            .into_iter()
            .partition(|(n, _)| n.starts_with(prefix));
        self.procs = keep;
        terminate(stop);
    }

    /// Starts `n` workers again (after [`BenchStack::stop_matching`]),
    /// with `env` on top of the config.
    pub async fn start_workers(
        &mut self,
        n: usize,
        env: &[(String, String)],
    ) -> anyhow::Result<()> {
        for i in 0..n {
            let addr = self.worker_addr(i);
            self.spawn(
                &format!("worker-{i}"),
                "seckill-worker",
                &["--listen", &addr],
                env,
            )?;
            wait_ok(&format!("http://{addr}/healthz"), Duration::from_secs(60)).await?;
        }
        Ok(())
    }

    /// Restarts the apis and the wallet with `env` on top of the config
    /// (the payment scenario sets `payment.mode` this way), and waits
    /// until they answer.
    pub async fn restart_payment_services(
        &mut self,
        env: &[(String, String)],
    ) -> anyhow::Result<()> {
        self.stop_matching("api-");
        self.stop_matching("wallet");
        let wallet = self.config.wallet.listen.to_string();
        self.spawn("wallet", "seckill-wallet", &["--listen", &wallet], env)?;
        let mut health = vec![format!("http://{wallet}/healthz")];
        for i in 0..self.api_addrs()?.len() {
            health.push(self.spawn_api(i, env)?);
        }
        for url in health {
            wait_ok(&url, Duration::from_secs(60)).await?;
        }
        Ok(())
    }

    /// The api pool's addresses.
    fn api_addrs(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .config
            .gateway
            .pools
            .get("api")
            .context("bench config needs pool `api`")?
            .backends
            .clone())
    }

    /// Starts api `i` (named `api-{i}`) with `env`; its health URL.
    pub fn spawn_api(&mut self, i: usize, env: &[(String, String)]) -> anyhow::Result<String> {
        let addr = self
            .api_addrs()?
            .get(i)
            .cloned()
            .context("no such api in the pool")?;
        self.spawn(
            &format!("api-{i}"),
            "seckill-api",
            &["--listen", &addr],
            env,
        )?;
        Ok(format!("http://{addr}/healthz"))
    }

    /// Kills (SIGKILL: no drain, no cleanup) the process named `name`.
    pub fn kill_hard(&mut self, name: &str) {
        if let Some(at) = self.procs.iter().position(|(n, _)| n == name) {
            let (_, mut child) = self.procs.remove(at);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// CPU time (user + system) the processes whose name starts with
    /// `prefix` have used so far.
    pub fn cpu_time(&self, prefix: &str) -> Duration {
        self.procs
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, child)| process_cpu_time(child.id()))
            .sum()
    }

    /// Where worker `i` listens: `worker.listen`'s port + i.
    fn worker_addr(&self, i: usize) -> String {
        let mut addr = self.config.worker.listen;
        addr.set_port(addr.port() + i as u16);
        addr.to_string()
    }

    /// Every process the stack started: its pid and name (`api-0`, …).
    pub fn pids(&self) -> Vec<(u32, String)> {
        self.procs
            .iter()
            .map(|(n, child)| (child.id(), n.clone()))
            .collect()
    }

    /// The pid of the first process whose name starts with `prefix`.
    pub fn pid(&self, prefix: &str) -> Option<u32> {
        self.procs
            .iter()
            .find(|(n, _)| n.starts_with(prefix))
            .map(|(_, child)| child.id())
    }

    pub fn gateway_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.config.gateway.listen)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.config.gateway.admin_listen)
    }
}

impl Drop for BenchStack {
    fn drop(&mut self) {
        terminate(std::mem::take(&mut self.procs));
    }
}

/// The pid of a running process whose command name is one of `names`
/// (e.g. the database server, which the bench did not start).
pub fn pid_named(names: &[&str]) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            names.contains(&comm.trim()).then_some(pid)
        })
}

/// CPU time (user + system) process `pid` has used, from
/// `/proc/<pid>/stat` (zero for a process that is gone).
pub fn process_cpu_time(pid: u32) -> Duration {
    let (user, system) = process_cpu_split(pid);
    user + system
}

/// (user, system) CPU time process `pid` has used: its own code and the
/// kernel's work on its behalf (syscalls, and on this kernel the network
/// stack's softirqs that run while it is on the CPU). Zero for a process
/// that is gone.
pub fn process_cpu_split(pid: u32) -> (Duration, Duration) {
    let (user, system) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The fields after the command name, which is in parentheses.
            let rest = stat.rsplit_once(')')?.1.to_string();
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some((utime, stime))
        })
        .unwrap_or((0, 0));
    let ticks = |t: u64| Duration::from_secs_f64(t as f64 / clock_ticks_per_sec());
    (ticks(user), ticks(system))
}

/// Context switches (voluntary and not) of every thread of process `pid`
/// so far, from `/proc/<pid>/task/*/status`: each one a thread that went
/// to sleep or was put off the CPU.
pub fn process_context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .map(|status| context_switches(&status))
        .sum()
}

/// `voluntary_ctxt_switches` + `nonvoluntary_ctxt_switches` of one
/// `/proc/.../status`.
fn context_switches(status: &str) -> u64 {
    status
        .lines()
        .filter(|l| l.contains("ctxt_switches:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// CPU time the whole machine has spent busy so far (every core, every
/// process, interrupts included; idle and I/O wait left out), from the
/// `cpu` line of `/proc/stat`: what a load cost in everything it touched.
pub fn machine_busy_time() -> Duration {
    let ticks = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|stat| busy_ticks(&stat))
        .unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / clock_ticks_per_sec())
}

/// user + nice + system + irq + softirq + steal of `/proc/stat`'s `cpu`
/// line (guest time is already inside user and nice).
fn busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal …
    let busy = [0, 1, 2, 5, 6, 7];
    busy.iter().map(|&i| fields.get(i).copied()).sum()
}

/// `getconf CLK_TCK`, the unit of `/proc/<pid>/stat` times (100 on Linux
/// when it cannot be asked).
fn clock_ticks_per_sec() -> f64 {
    static TICKS: std::sync::LazyLock<f64> = std::sync::LazyLock::new(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    });
    *TICKS
}

/// Refuses a port something already listens on. Pingora retries a taken
/// port for a while instead of exiting, so a gateway left running by hand
/// would pass the stack's health checks and serve the whole run, and the
/// bench's gateway would measure zero CPU. (std binds with SO_REUSEADDR,
/// so connections of an earlier run in TIME_WAIT do not count.)
fn ensure_free(addr: &str) -> anyhow::Result<()> {
    std::net::TcpListener::bind(addr)
        .map(drop)
        .with_context(|| format!("{addr} is already in use: stop what listens there (a gateway or api left running?) and run again"))
}

fn terminate(procs: Vec<(String, Child)>) {
    for (_, child) in &procs {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
    }
    for (name, mut child) in procs {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    eprintln!("{name} did not stop in time; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
    }
}

/// Polls `url` until it answers 200.
pub async fn wait_ok(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if let Ok(r) = client
            .get(url)
            .timeout(Duration::from_millis(500))
            .send()
            .await
        {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{url} not healthy after {timeout:?}")
}

/// Empties the bench's queues (a missing queue is fine: nothing to purge).
async fn purge_queues(config: &Config) -> anyhow::Result<()> {
    let conn = lapin::Connection::connect(&config.amqp.url, Default::default()).await?;
    let a = &config.amqp;
    for q in [
        &a.queue,
        &a.dead_letter_queue,
        &a.close_delay_queue,
        &a.close_queue,
        &a.payment_queue,
        &a.refund_queue,
    ] {
        let ch = conn.create_channel().await?;
        match ch.queue_purge(q.as_str().into(), Default::default()).await {
            Ok(_) => {
                let _ = ch.close(200, "".into()).await;
            }
            Err(e) if e.is_amqp_soft_error() => {}
            Err(e) => return Err(e.into()),
        }
    }
    let _ = conn.close(200, "".into()).await;
    Ok(())
}

/// Publishes order messages to the bench's order queue as the gateway
/// does (persistent, confirmed), for the drain scenario.
pub async fn publish_orders(
    config: &Config,
    messages: &[seckill_contracts::OrderMessage],
) -> anyhow::Result<()> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let conn = lapin::Connection::connect(&config.amqp.url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    seckill_contracts::amqp_topology::declare(
        &ch,
        &config.amqp,
        seckill_contracts::amqp_topology::close_delay_ms(&config.worker),
    )
    .await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let routing = seckill_contracts::amqp_topology::order_routing_key(&config.amqp);
    for chunk in messages.chunks(1000) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for m in chunk {
            let body = serde_json::to_vec(m)?;
            let props = lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(m.message_id.as_str().into())
                .with_content_type("application/json".into());
            confirms.push(
                ch.basic_publish(
                    config.amqp.exchange.as_str().into(),
                    routing.into(),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await?,
            );
        }
        for c in confirms {
            c.await?;
        }
    }
    let _ = conn.close(200, "".into()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_something_listens_on_is_refused() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        let addr = taken.local_addr().expect("has an address").to_string();
        let err = ensure_free(&addr).expect_err("the port is taken");
        assert!(err.to_string().contains("already in use"), "{err}");
        drop(taken);
        ensure_free(&addr).expect("the port is free again");
    }

    #[test]
    fn busy_time_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 5 50 9000 40 3 7 2 0 0\ncpu0 50 2 25 4500 20 1 3 1 0 0\n";
        assert_eq!(busy_ticks(stat), Some(100 + 5 + 50 + 3 + 7 + 2));
        assert_eq!(busy_ticks("cpu  1 2 3\n"), None);
        assert_eq!(busy_ticks("intr 5\n"), None);
    }

    #[test]
    fn context_switches_add_both_kinds() {
        let status = "Name:\tseckill-gateway\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(context_switches(status), 127);
        assert_eq!(context_switches("Name: x\n"), 0);
    }
}
