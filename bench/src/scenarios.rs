//! The scenarios and ceilings of the suite, run in one go against one bench
//! stack. Each scenario returns a [`Row`] of the report; sale scenarios are
//! audited and a failed audit fails the run.
//!
//! | scenario | load | ceiling it is compared with |
//! |---|---|---|
//! | `hot-sale` | POST seckill, rotating buyers, until and past sell-out | gateway local route, no Lua |
//! | `sold-out` | the same sale after sell-out (local mark) | gateway local route |
//! | `browse` | GET a sale page: the edge micro-cache's hits (one upstream fetch a second) | nginx `return 200` |
//! | `reload` | hot-sale load while rules reload every second | gateway local route |
//! | `drain` | 10,000 queued orders into MySQL by the workers | — |
//! | `dashboard` | one connection polling the `/ops` figures | — |
//! | `pay` | 2,000 buyers paying their orders at once, in each payment mode; then again with an api killed mid-run | — |
//! | `openresty` | hot-sale and sold-out on the gateway and on the OpenResty peer, alternating rounds | nginx `return 410`, one worker; the gateway's `/healthz`; a bare Pingora app's 410 |
//!
//! With `--cluster`, hot-sale and sold-out run in alternating rounds on
//! this stack and on the scale-out topology of `scripts/cluster` instead
//! (see [`crate::scaleout`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::Utc;
use clap::Parser;
use seckill_contracts::keys::KeySchema;
use seckill_workers::audit;
use seckill_workers::sales::{self, NewSale};
use serde::Serialize;
use tokio::sync::watch;

use crate::report::{self, Report};
use crate::sampler::{self, Sample, StatusCounts};
use crate::scaleout::Side;
use crate::stack::BenchStack;
use crate::wrk::{WrkResult, WrkRun};
use crate::{buyers, dashboards, stack};

/// `seckill-bench` flags (sizes and durations of the suite).
#[derive(Debug, Clone, Parser)]
#[command(
    version,
    about = "Flash-sale benchmark suite (run it through bench/run)"
)]
pub struct Options {
    /// Scenarios to run (default: all). Ceilings always run.
    #[arg(value_parser = ["hot-sale", "sold-out", "browse", "reload", "drain", "dashboard", "openresty", "pay"])]
    pub scenarios: Vec<String>,
    #[arg(long, default_value = "bench/bench.toml")]
    pub config: PathBuf,
    /// Where the release binaries are.
    #[arg(long, default_value = "target/release")]
    pub bin_dir: PathBuf,
    /// Reports go to <results>/<timestamp>/.
    #[arg(long, default_value = "bench/results")]
    pub results: PathBuf,
    #[arg(long, default_value_t = 20_000)]
    pub users: u64,
    #[arg(long, default_value_t = 2_000)]
    pub stock: u32,
    /// Seconds of load per scenario.
    #[arg(long, default_value_t = 15)]
    pub duration: u64,
    #[arg(long, default_value_t = 128)]
    pub connections: u32,
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// Orders queued for the drain scenario.
    #[arg(long, default_value_t = 10_000)]
    pub drain_orders: u32,
    /// Buyers paying at once, per mode and round, in the pay scenario.
    #[arg(long, default_value_t = 2_000)]
    pub pay_orders: u64,
    /// Database connections per pool of the apis and the wallet in the pay
    /// scenario (on 2 cores, 6 measured 10 to 27 % more payments/s than 16:
    /// each connection is a MariaDB thread).
    #[arg(long, default_value_t = 6)]
    pub pay_db_connections: u32,
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// `/ops` dashboards open during hot-sale (each polls every second).
    #[arg(long, default_value_t = 0)]
    pub dashboards: usize,
    /// Alternating rounds of the openresty comparison and of `--cluster`.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Run hot-sale and sold-out on this stack and, in alternating rounds,
    /// through both VIPs of the scale-out topology (`scripts/cluster up`
    /// when it is not up; root), and compare their CPU per request.
    #[arg(long)]
    pub cluster: bool,
    /// The topology's config, for `--cluster`.
    #[arg(long, default_value = crate::cluster::CONFIG)]
    pub cluster_config: PathBuf,
    /// Record the gateway with perf during hot-sale and sold-out: a flame
    /// graph per scenario next to the report; with `pay`, the whole
    /// machine during each mode's first round (see `profile`).
    #[arg(long)]
    pub profile: bool,
}

/// One line of the report table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub wrk: Option<WrkResult>,
    /// Gateway responses during the load, by status.
    pub statuses: StatusCounts,
    pub admitted: Option<u64>,
    pub committed: Option<u64>,
    pub audit_ok: Option<bool>,
    pub ceiling: Option<String>,
    pub notes: Vec<String>,
    pub samples: Vec<Sample>,
    /// Throughput for the drain scenario (orders/s) or the ceiling figure.
    pub rate: f64,
    /// CPU per request (`--cluster` rows).
    pub cpu: Option<CpuPerRequest>,
    /// `pay` rows: seconds from killing an api mid-run until every
    /// payment had ended and the audits were clean.
    pub consistency_s: Option<f64>,
    /// `pay` rows: (statements, CPU µs) of the database server per payment.
    pub db_per_payment: Option<(f64, f64)>,
}

/// What one answered request cost in CPU time, in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuPerRequest {
    /// The gateways serving the load (both, on the cluster).
    pub gateway_us: f64,
    /// The part of `gateway_us` spent in the kernel (system time).
    pub gateway_kernel_us: f64,
    /// The whole machine: every process and the kernel.
    pub machine_us: f64,
}

impl Row {
    pub(crate) fn new(scenario: &str) -> Row {
        Row {
            scenario: scenario.to_string(),
            wrk: None,
            statuses: StatusCounts::new(),
            admitted: None,
            committed: None,
            audit_ok: None,
            ceiling: None,
            notes: Vec::new(),
            samples: Vec::new(),
            rate: 0.0,
            cpu: None,
            consistency_s: None,
            db_per_payment: None,
        }
    }
}

struct Ctx {
    opts: Options,
    stack: BenchStack,
    out: PathBuf,
    wrk_dir: PathBuf,
    http: reqwest::Client,
    keys: KeySchema,
    db: sqlx::MySqlPool,
    redis: seckill_contracts::redis_client::RedisConn,
    tokens: Arc<Vec<String>>,
}

/// Runs the whole suite; returns true if any audit failed.
pub async fn run_suite(opts: Options) -> anyhow::Result<bool> {
    let stamp = Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let out = opts.results.join(&stamp);
    std::fs::create_dir_all(&out)?;
    let all = [
        "hot-sale",
        "sold-out",
        "browse",
        "reload",
        "drain",
        "dashboard",
    ];
    let chosen: Vec<String> = if opts.scenarios.is_empty() {
        all.iter().map(|s| s.to_string()).collect()
    } else {
        opts.scenarios.clone()
    };
    progress(&format!(
        "starting the bench stack (logs in {})",
        out.join("logs").display()
    ));
    let stack =
        BenchStack::start(&opts.config, &opts.bin_dir, &out.join("logs"), opts.workers).await?;
    let db = seckill_workers::connections::mysql(&stack.config.database).await?;
    let redis = seckill_workers::connections::redis(&stack.config).await?;
    progress(&format!("minting {} buyer tokens", opts.users));
    let tokens = {
        let config = stack.config.clone();
        let n = opts.users;
        tokio::task::spawn_blocking(move || buyers::tokens(&config, &PathBuf::from("var/bench"), n))
            .await??
    };
    let mut cluster = if opts.cluster {
        Some(cluster_side(&opts, &chosen, &out).await?)
    } else {
        None
    };
    let mut ctx = Ctx {
        keys: KeySchema::new(stack.config.redis.key_prefix.clone()),
        wrk_dir: PathBuf::from("bench/wrk"),
        opts,
        stack,
        out: out.clone(),
        http: reqwest::Client::new(),
        db,
        redis,
        tokens: Arc::new(tokens),
    };

    if ctx.opts.profile {
        crate::profile::check_tools()?;
    }
    let mut rows = Vec::new();
    progress("ceiling: gateway local route (no Lua)");
    rows.push(ceiling_local(&ctx).await?);
    progress("ceiling: nginx return 200");
    rows.push(ceiling_nginx(&ctx).await?);
    progress("ceiling: redis-benchmark of the admission script");
    rows.push(ceiling_redis(&mut ctx).await?);

    let mut hot_sale_id = None;
    for name in &chosen {
        let compared = matches!(name.as_str(), "hot-sale" | "sold-out") && ctx.opts.cluster;
        if compared && cluster.is_none() {
            // The comparison ran both scenarios already.
            continue;
        }
        progress(&format!("scenario {name}"));
        let row = match name.as_str() {
            "hot-sale" | "sold-out" if compared => {
                // One comparison runs both scenarios on both sides.
                let cluster = cluster.take().context("no cluster side")?;
                let mut sides = [single_side(&ctx)?, cluster];
                let (mut made, sale) =
                    crate::scaleout::compare(&mut sides, &ctx.opts, &ctx.out).await?;
                hot_sale_id = sale;
                let last = made.pop().context("the comparison made no rows")?;
                for row in made {
                    progress(&summary(&row));
                    rows.push(row);
                }
                last
            }
            "hot-sale" => {
                let (row, sale) = hot_sale(&mut ctx, "hot-sale", false).await?;
                hot_sale_id = Some(sale);
                row
            }
            "sold-out" => {
                let sale = match hot_sale_id {
                    Some(s) => s,
                    None => hot_sale(&mut ctx, "hot-sale (setup)", false).await?.1,
                };
                sold_out(&mut ctx, sale).await?
            }
            "browse" => browse(&mut ctx).await?,
            "reload" => hot_sale(&mut ctx, "reload", true).await?.0,
            "drain" => drain(&mut ctx).await?,
            "dashboard" => dashboard(&mut ctx, hot_sale_id).await?,
            "pay" => {
                let mut pay = crate::payments::PayCtx {
                    stack: &mut ctx.stack,
                    db: ctx.db.clone(),
                    redis: ctx.redis.clone(),
                    keys: ctx.keys.clone(),
                    tokens: ctx.tokens.clone(),
                    http: ctx.http.clone(),
                    orders: ctx.opts.pay_orders.min(ctx.opts.users),
                    rounds: ctx.opts.rounds,
                    db_connections: ctx.opts.pay_db_connections,
                    profile_to: ctx.opts.profile.then(|| ctx.out.clone()),
                };
                let mut modes = crate::payments::run(&mut pay).await?;
                let last = modes.pop().context("the pay scenario made no rows")?;
                for row in modes {
                    progress(&summary(&row));
                    rows.push(row);
                }
                last
            }
            "openresty" => {
                let mut compared = openresty(&mut ctx).await?;
                let last = compared.pop().context("the comparison made no rows")?;
                for row in compared {
                    progress(&summary(&row));
                    rows.push(row);
                }
                last
            }
            other => anyhow::bail!("unknown scenario {other}"),
        };
        progress(&summary(&row));
        rows.push(row);
    }
    let failed = rows.iter().any(|r| r.audit_ok == Some(false));
    let report = Report {
        rows,
        options: ctx.opts.clone(),
        machine: report::machine(),
        started: stamp,
    };
    report::write(&report, &out)?;
    progress(&format!("report: {}", out.join("report.md").display()));
    Ok(failed)
}

/// The single-host side of `--cluster`: this bench stack's gateway.
fn single_side(ctx: &Ctx) -> anyhow::Result<Side> {
    Ok(Side {
        name: crate::scaleout::SINGLE,
        config: ctx.stack.config.clone(),
        db: ctx.db.clone(),
        redis: ctx.redis.clone(),
        keys: ctx.keys.clone(),
        tokens: ctx.tokens.clone(),
        urls: vec![ctx.stack.gateway_url("/")],
        metrics: vec![ctx.stack.admin_url("/metrics")],
        admin_token: ctx.stack.admin_token.clone(),
        pids: vec![ctx.stack.pid("gateway").context("no bench gateway")?],
    })
}

/// The cluster side of `--cluster`: the topology made ready (brought up
/// when it is not), its buyers minted.
async fn cluster_side(opts: &Options, chosen: &[String], out: &Path) -> anyhow::Result<Side> {
    if !chosen.iter().any(|s| s == "hot-sale" || s == "sold-out") {
        bail!("--cluster compares hot-sale and sold-out: name one of them (or no scenario)");
    }
    let log = out.join("logs").join("cluster.log");
    progress(&format!(
        "the cluster topology (scripts/cluster, output in {})",
        log.display()
    ));
    let topology =
        crate::cluster::Topology::ready(&opts.cluster_config, &opts.bin_dir, &log).await?;
    Side::cluster(&topology, opts.users).await
}

pub(crate) fn progress(msg: &str) {
    eprintln!("[bench {}] {msg}", Utc::now().format("%H:%M:%S"));
}

fn summary(row: &Row) -> String {
    match &row.wrk {
        Some(w) => format!(
            "{}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, statuses {:?}, audit {:?}",
            row.scenario, w.rps, w.p50_ms, w.p99_ms, row.statuses, row.audit_ok
        ),
        None => format!(
            "{}: {:.0}/s, audit {:?}",
            row.scenario, row.rate, row.audit_ok
        ),
    }
}

impl Ctx {
    fn wrk(&self, url: String, script: &str, env: Vec<(String, String)>) -> WrkRun<'static> {
        let script: &'static std::path::Path =
            Box::leak(self.wrk_dir.join(script).into_boxed_path());
        let mut env = env;
        env.push(("WRK_THREADS".into(), self.opts.threads.to_string()));
        WrkRun {
            url,
            script,
            env,
            threads: self.opts.threads,
            connections: self.opts.connections,
            duration: Duration::from_secs(self.opts.duration),
        }
    }

    /// With `--profile`, perf attached to the gateway for one load's length.
    fn profile(&self, scenario: &str) -> anyhow::Result<Option<crate::profile::Profile>> {
        if !self.opts.profile {
            return Ok(None);
        }
        let pid = self
            .stack
            .pid("gateway")
            .context("no gateway process to profile")?;
        let name: String = scenario
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let length = Duration::from_secs(self.opts.duration);
        crate::profile::Profile::attach(pid, &name, &self.out, length).map(Some)
    }

    /// Runs `run` while sampling the gateway; returns wrk's result, the
    /// per-second samples and the status counts of `route`.
    async fn measured(
        &self,
        run: WrkRun<'static>,
        route: Option<&str>,
    ) -> anyhow::Result<(WrkResult, Vec<Sample>, StatusCounts)> {
        let metrics = self.stack.admin_url("/metrics");
        let token = self.stack.admin_token.clone();
        let before = sampler::scrape(&self.http, &metrics, &token, route).await?;
        let (tx, rx) = watch::channel(false);
        let sampler = tokio::spawn(sampler::sample_until(
            metrics.clone(),
            token.clone(),
            route.map(str::to_string),
            rx,
        ));
        let result = tokio::task::spawn_blocking(move || run.run()).await??;
        let _ = tx.send(true);
        let samples = sampler.await.unwrap_or_default();
        let after = sampler::scrape(&self.http, &metrics, &token, route).await?;
        Ok((result, samples, sampler::delta(&before, &after)))
    }

    async fn create_sale(&mut self, stock: u32, starts_in: Duration) -> anyhow::Result<u64> {
        let now = Utc::now();
        let starts_at = now + chrono::Duration::from_std(starts_in)?;
        let sale = sales::create(
            &self.db,
            &mut self.redis,
            &self.keys,
            &NewSale {
                title: "Bench sale".into(),
                price_cents: 1999,
                sale_price_cents: 999,
                stock,
                starts_at,
                ends_at: starts_at + chrono::Duration::hours(1),
            },
        )
        .await?;
        Ok(sale.id)
    }

    async fn audit(&mut self, sale_id: u64, row: &mut Row) -> anyhow::Result<()> {
        let report = audit::run(
            &self.stack.config,
            &self.db,
            &mut self.redis,
            sale_id,
            Duration::from_secs(120),
        )
        .await?;
        row.committed =
            Some((report.orders_unpaid + report.orders_paid + report.orders_closed) as u64);
        row.audit_ok = Some(report.ok);
        if !report.ok {
            row.notes.extend(report.violations.iter().cloned());
        }
        std::fs::write(
            self.out.join(format!(
                "audit-{}-{sale_id}.json",
                row.scenario.replace(' ', "_")
            )),
            serde_json::to_string_pretty(&report)?,
        )?;
        Ok(())
    }
}

async fn ceiling_local(ctx: &Ctx) -> anyhow::Result<Row> {
    let run = ctx.wrk(ctx.stack.gateway_url("/healthz"), "report.lua", vec![]);
    let (w, samples, statuses) = ctx.measured(run, None).await?;
    let mut row = Row::new("ceiling: gateway local route");
    row.rate = w.rps;
    row.wrk = Some(w);
    row.samples = samples;
    row.statuses = statuses;
    Ok(row)
}

async fn ceiling_nginx(ctx: &Ctx) -> anyhow::Result<Row> {
    let url = "http://127.0.0.1:18090/";
    let conf = std::fs::read_to_string("bench/gateway/nginx.conf")?;
    let nginx = crate::peer::Nginx::start(&ctx.out.join("nginx"), &conf, url).await;
    let result = match nginx {
        Ok(_running) => {
            let run = ctx.wrk(url.into(), "report.lua", vec![]);
            tokio::task::spawn_blocking(move || run.run()).await?
        }
        Err(e) => Err(e),
    };
    let w = result?;
    let mut row = Row::new("ceiling: nginx return 200");
    row.rate = w.rps;
    row.wrk = Some(w);
    Ok(row)
}

/// `redis-benchmark` of admit.lua alone (EVALSHA, a path that is never
/// right, so it measures the script's checks without moving stock).
async fn ceiling_redis(ctx: &mut Ctx) -> anyhow::Result<Row> {
    let sale = ctx.create_sale(1, Duration::ZERO).await?;
    let source = std::fs::read_to_string("lua/redis/admit.lua")?;
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(&source)
        .query_async(&mut ctx.redis)
        .await?;
    let k = ctx.keys.sale(sale);
    let url = &ctx.stack.config.redis.url;
    let hostport = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .rsplit('@')
        .next()
        .unwrap_or("127.0.0.1:6379")
        .to_string();
    let (host, port) = hostport.split_once(':').unwrap_or(("127.0.0.1", "6379"));
    let n = 200_000u32;
    let args: Vec<String> = vec![
        "-h".into(),
        host.into(),
        "-p".into(),
        port.into(),
        "-n".into(),
        n.to_string(),
        "-c".into(),
        "64".into(),
        "-P".into(),
        "1".into(),
        "-q".into(),
        "EVALSHA".into(),
        sha,
        "6".into(),
        k.info(),
        k.stock(),
        k.buyers(),
        k.reservations(),
        k.path(1),
        k.limit(1),
        "1".into(),
        "0123456789abcdef0123456789abcdef".into(),
        "bench".into(),
        "1000000000".into(),
        "1000".into(),
    ];
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("redis-benchmark")
            .args(&args)
            .output()
    })
    .await?
    .context("running redis-benchmark")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "-q" prints e.g. "EVALSHA ...: 85034.01 requests per second, p50=0.303 msec"
    let rps = text
        .split("requests per second")
        .next()
        .and_then(|s| s.rsplit(": ").next())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or_else(|| n as f64 / started.elapsed().as_secs_f64());
    let mut row = Row::new("ceiling: redis admit.lua (redis-benchmark -c64)");
    row.rate = rps;
    row.notes.push(format!(
        "redis-benchmark -n {n} -c 64 -q EVALSHA <admit.lua> 6 <keys> … (bad-path branch)"
    ));
    Ok(row)
}

/// A fresh sale, buyers with paths, wrk until `duration`: time to sell
/// out, admitted == stock, audit. With `reload`, the rules are reloaded
/// every second meanwhile and no request may fail because of it.
async fn hot_sale(ctx: &mut Ctx, name: &str, reload: bool) -> anyhow::Result<(Row, u64)> {
    let stock = ctx.opts.stock;
    // Warm-up before start: the sale opens once the load is on.
    let sale = ctx.create_sale(stock, Duration::from_secs(3)).await?;
    let file = ctx.out.join(format!("buyers-{sale}.txt"));
    buyers::issue_paths(&mut ctx.redis, &ctx.keys, sale, &ctx.tokens, &file).await?;
    let opens = Instant::now() + Duration::from_secs(3);
    tokio::time::sleep_until(opens.into()).await;

    // Watch the stock counter to time the sell-out.
    let (tx, watcher) = watch_sell_out(ctx.redis.clone(), ctx.keys.sale(sale).stock());
    let reloader = reload.then(|| {
        let url = ctx.stack.admin_url("/admin/rules/reload");
        let token = ctx.stack.admin_token.clone();
        let http = ctx.http.clone();
        let mut stop = tx.subscribe();
        tokio::spawn(async move {
            let (mut ok, mut refused) = (0u32, 0u32);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return (ok, refused),
                }
                match http.post(&url).bearer_auth(&token).send().await {
                    Ok(r) if r.status().is_success() => ok += 1,
                    _ => refused += 1,
                }
            }
        })
    });
    let dashboards = (ctx.opts.dashboards > 0).then(|| {
        dashboards::spawn(
            ctx.http.clone(),
            ctx.stack.gateway_url(&format!("/ops/api/sales/{sale}")),
            ctx.stack.admin_token.clone(),
            ctx.opts.dashboards,
            tx.subscribe(),
        )
    });
    let run = ctx.wrk(
        ctx.stack.gateway_url("/"),
        "seckill.lua",
        vec![
            (
                "BENCH_USERS".into(),
                std::fs::canonicalize(&file)?.to_string_lossy().into_owned(),
            ),
            ("SALE_ID".into(), sale.to_string()),
        ],
    );
    let metrics = ctx.stack.admin_url("/metrics");
    let token = ctx.stack.admin_token.clone();
    // The api serves nothing of the sale itself: during the load its CPU is
    // its background (health checks, its fleet report) and any dashboards.
    let api_cpu_before = ctx.stack.cpu_time("api-");
    let text_before = sampler::metrics_text(&ctx.http, &metrics, &token).await?;
    let confirms_before = sampler::confirm_buckets(&text_before);
    let latency_before = sampler::latency_buckets(&text_before, "seckill");
    let profile = ctx.profile(name)?;
    let (w, samples, statuses) = ctx.measured(run, Some("seckill")).await?;
    let _ = tx.send(true);
    let sold_out_after = watcher.await.ok().flatten();
    let text_after = sampler::metrics_text(&ctx.http, &metrics, &token).await?;
    let confirms_after = sampler::confirm_buckets(&text_after);
    let latency_after = sampler::latency_buckets(&text_after, "seckill");

    let mut row = Row::new(name);
    if let Some(p) = profile {
        row.notes.extend(p.finish()?);
    }
    row.admitted = Some(*statuses.get(&202).unwrap_or(&0));
    match sold_out_after {
        Some(t) => row
            .notes
            .push(format!("sold out after {:.2} s", t.as_secs_f64())),
        None => row.notes.push("did not sell out during the run".into()),
    }
    // An admitted buyer's answer waits for the broker's confirm; during the
    // sell-out that wait is what the tail of the whole route is made of.
    let bound = |q| sampler::bucket_quantile(&confirms_before, &confirms_after, q);
    if let (Some((p50, n)), Some((p99, _))) = (bound(0.5), bound(0.99)) {
        row.notes.push(format!(
            "publisher confirm wait of the {n} admitted requests (gateway histogram): \
             p50 ≤ {:.1} ms, p99 ≤ {:.1} ms",
            p50 * 1e3,
            p99 * 1e3
        ));
    }
    if let Some(note) = first_second(&latency_before, &samples, &latency_after) {
        row.notes.push(note);
    }
    let api_cpu = ctx.stack.cpu_time("api-").saturating_sub(api_cpu_before);
    row.notes.push(format!(
        "the api processes used {:.0} ms of CPU during the load",
        api_cpu.as_secs_f64() * 1e3
    ));
    if let Some(d) = dashboards {
        if let Ok(stats) = d.await {
            row.notes.push(stats.note());
        }
    }
    if row.admitted != Some(u64::from(stock)) {
        row.notes.push(format!(
            "admitted {} != stock {stock}",
            row.admitted.unwrap_or(0)
        ));
        row.audit_ok = Some(false);
    }
    if let Some(r) = reloader {
        let (ok, refused) = r.await.unwrap_or((0, 0));
        let failed: u64 = statuses
            .iter()
            .filter(|(code, _)| **code >= 500)
            .map(|(_, n)| n)
            .sum();
        row.notes.push(format!(
            "{ok} reloads accepted, {refused} refused; {failed} requests failed (5xx) during reloads"
        ));
        if failed > 0 || refused > 0 {
            row.audit_ok = Some(false);
        }
    }
    row.wrk = Some(w);
    row.samples = samples;
    row.statuses = statuses;
    row.ceiling = Some("ceiling: gateway local route".into());
    let before = row.audit_ok;
    ctx.audit(sale, &mut row).await?;
    if before == Some(false) {
        row.audit_ok = Some(false);
    }
    Ok((row, sale))
}

/// The sale's first second against the rest of the run, from the
/// gateway's own latency histogram of the route (wrk reports the run as a
/// whole): the opening burst, when the admitted requests wait for the
/// broker, is where the tail comes from.
fn first_second(
    before: &sampler::Buckets,
    samples: &[Sample],
    after: &sampler::Buckets,
) -> Option<String> {
    let at_one = &samples.first()?.latency;
    let q = |from: &sampler::Buckets, to: &sampler::Buckets, q: f64| {
        sampler::bucket_quantile(from, to, q).map(|(bound, n)| (bound * 1e3, n))
    };
    let (Some((p50, n1)), Some((p99, _))) = (q(before, at_one, 0.5), q(before, at_one, 0.99))
    else {
        return None;
    };
    let mut note = format!(
        "first second (gateway histogram, bucket bounds): {n1} requests, p50 ≤ {p50} ms, p99 ≤ {p99} ms"
    );
    if let (Some((r50, n2)), Some((r99, _))) = (q(at_one, after, 0.5), q(at_one, after, 0.99)) {
        note.push_str(&format!(
            "; the rest: {n2} requests, p50 ≤ {r50} ms, p99 ≤ {r99} ms"
        ));
    }
    Some(note)
}

async fn sold_out(ctx: &mut Ctx, sale: u64) -> anyhow::Result<Row> {
    let file = ctx.out.join(format!("buyers-{sale}.txt"));
    let run = ctx.wrk(
        ctx.stack.gateway_url("/"),
        "seckill.lua",
        vec![
            (
                "BENCH_USERS".into(),
                std::fs::canonicalize(&file)?.to_string_lossy().into_owned(),
            ),
            ("SALE_ID".into(), sale.to_string()),
        ],
    );
    let profile = ctx.profile("sold-out")?;
    let (w, samples, statuses) = ctx.measured(run, Some("seckill")).await?;
    let mut row = Row::new("sold-out");
    if let Some(p) = profile {
        row.notes.extend(p.finish()?);
    }
    row.admitted = Some(*statuses.get(&202).unwrap_or(&0));
    if row.admitted != Some(0) {
        row.notes.push("admitted after sell-out".into());
        row.audit_ok = Some(false);
    }
    row.wrk = Some(w);
    row.samples = samples;
    row.statuses = statuses;
    row.ceiling = Some("ceiling: gateway local route".into());
    let before = row.audit_ok;
    ctx.audit(sale, &mut row).await?;
    if before == Some(false) {
        row.audit_ok = Some(false);
    }
    Ok(row)
}

async fn browse(ctx: &mut Ctx) -> anyhow::Result<Row> {
    let sale = ctx.create_sale(10, Duration::ZERO).await?;
    // Prime the caches once (the api's and the edge's), as the first buyer
    // would; after that the edge answers and refreshes the page once a
    // second.
    let url = ctx.stack.gateway_url(&format!("/api/v1/sales/{sale}"));
    ctx.http.get(&url).send().await?.error_for_status()?;
    let run = ctx.wrk(url, "report.lua", vec![]);
    let (w, samples, statuses) = ctx.measured(run, Some("sale_detail")).await?;
    let mut row = Row::new("browse");
    row.wrk = Some(w);
    row.samples = samples;
    row.statuses = statuses;
    row.ceiling = Some("ceiling: nginx return 200".into());
    Ok(row)
}

/// What one `/ops` poll costs: one connection polling the sale's figures
/// back to back on the otherwise idle stack (after the load scenarios, on
/// the hot sale's thousands of orders when it ran), so its latency is the
/// endpoint's own work: MySQL, Redis, RabbitMQ and the fleet reports.
async fn dashboard(ctx: &mut Ctx, sale: Option<u64>) -> anyhow::Result<Row> {
    let sale = match sale {
        Some(s) => s,
        None => ctx.create_sale(10, Duration::ZERO).await?,
    };
    let script: &'static std::path::Path = Box::leak(ctx.wrk_dir.join("ops.lua").into_boxed_path());
    let run = WrkRun {
        url: ctx.stack.gateway_url(&format!("/ops/api/sales/{sale}")),
        script,
        env: vec![("TOKEN".into(), ctx.stack.admin_token.clone())],
        threads: 1,
        connections: 1,
        duration: Duration::from_secs(ctx.opts.duration.min(10)),
    };
    let (api_before, gateway_before) = (ctx.stack.cpu_time("api-"), ctx.stack.cpu_time("gateway"));
    let (w, samples, statuses) = ctx.measured(run, Some("ops_api")).await?;
    let per_poll = |before: Duration, prefix: &str| {
        let used = ctx.stack.cpu_time(prefix).saturating_sub(before);
        used.as_secs_f64() * 1e6 / (w.requests.max(1) as f64)
    };
    let mut row = Row::new("dashboard");
    row.notes.push(format!(
        "one connection, back to back, GET /ops/api/sales/{sale} with the admin token; \
         CPU per poll: api {:.0} µs, gateway {:.0} µs",
        per_poll(api_before, "api-"),
        per_poll(gateway_before, "gateway")
    ));
    // 0: the request wrk's stop cut off mid-flight (no answer was sent).
    if statuses.keys().any(|code| *code != 200 && *code != 0) {
        row.notes.push(format!("non-200 answers: {statuses:?}"));
        row.audit_ok = Some(false);
    }
    row.wrk = Some(w);
    row.samples = samples;
    row.statuses = statuses;
    Ok(row)
}

/// Who serves the load in the openresty comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Gateway,
    Peer,
}

/// One target's run of one scenario.
struct Measured {
    wrk: WrkResult,
    cpu_us_per_request: f64,
}

/// Gateway against the OpenResty peer (`bench/peers/openresty`): the same
/// wrk script and buyers on a fresh sale each, hot-sale then sold-out,
/// `--rounds` alternating rounds (who goes first swaps every round), CPU
/// per request of each from `/proc`; plus nginx `return 410` with one
/// worker, the floor of an nginx edge. Rows are the medians by req/s.
async fn openresty(ctx: &mut Ctx) -> anyhow::Result<Vec<Row>> {
    let peer = crate::peer::Peer::start(&ctx.stack.config_path, &ctx.out.join("openresty")).await?;
    let mut runs: BTreeMap<(&str, &str), Vec<Measured>> = BTreeMap::new();
    for round in 0..ctx.opts.rounds.max(1) {
        let order = if round % 2 == 0 {
            [Target::Gateway, Target::Peer]
        } else {
            [Target::Peer, Target::Gateway]
        };
        for target in order {
            let (name, url) = match target {
                Target::Gateway => ("gateway", ctx.stack.gateway_url("/")),
                Target::Peer => ("openresty", format!("{}/", peer.url)),
            };
            progress(&format!("openresty comparison: round {} {name}", round + 1));
            let peer = &peer;
            let cpu = move |stack: &BenchStack| match target {
                Target::Gateway => stack.cpu_time("gateway"),
                Target::Peer => peer.cpu_time(),
            };
            let (hot, sold_out, sale) = sale_on(ctx, &url, &cpu).await?;
            if target == Target::Gateway {
                let mut audit_row = Row::new("gateway audit");
                ctx.audit(sale, &mut audit_row).await?;
                if audit_row.audit_ok != Some(true) {
                    bail!(
                        "the gateway's sale {sale} failed its audit: {:?}",
                        audit_row.notes
                    );
                }
            }
            runs.entry(("hot-sale", name)).or_default().push(hot);
            runs.entry(("sold-out", name)).or_default().push(sold_out);
        }
        runs.entry(("floor", "nginx return 410"))
            .or_default()
            .push(nginx_floor(ctx).await?);
        runs.entry(("floor", "gateway /healthz"))
            .or_default()
            .push(gateway_floor(ctx).await?);
        runs.entry(("floor", "bare Pingora 410"))
            .or_default()
            .push(pingora_floor(ctx).await?);
    }
    drop(peer);
    Ok(comparison_rows(&runs))
}

/// A fresh sale opened under `url`'s load: wrk hot-sale, then sold-out on
/// the same sale; each with the target's CPU per request.
async fn sale_on(
    ctx: &mut Ctx,
    url: &str,
    cpu: &dyn Fn(&BenchStack) -> Duration,
) -> anyhow::Result<(Measured, Measured, u64)> {
    let sale = ctx
        .create_sale(ctx.opts.stock, Duration::from_secs(2))
        .await?;
    let file = ctx.out.join(format!("buyers-{sale}.txt"));
    buyers::issue_paths(&mut ctx.redis, &ctx.keys, sale, &ctx.tokens, &file).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let users = std::fs::canonicalize(&file)?.to_string_lossy().into_owned();
    let one = || {
        let run = ctx.wrk(
            url.to_string(),
            "seckill.lua",
            vec![
                ("BENCH_USERS".into(), users.clone()),
                ("SALE_ID".into(), sale.to_string()),
            ],
        );
        let stack = &ctx.stack;
        async move {
            let before = cpu(stack);
            let w = tokio::task::spawn_blocking(move || run.run()).await??;
            let used = cpu(stack).saturating_sub(before);
            let per = used.as_secs_f64() * 1e6 / (w.requests.max(1) as f64);
            anyhow::Ok(Measured {
                wrk: w,
                cpu_us_per_request: per,
            })
        }
    };
    let hot = one().await?;
    let sold_out = one().await?;
    Ok((hot, sold_out, sale))
}

/// nginx `return 410` with one worker, as the peer runs: what any nginx
/// edge costs per request before it does anything.
async fn nginx_floor(ctx: &Ctx) -> anyhow::Result<Measured> {
    let conf = std::fs::read_to_string("bench/gateway/nginx.conf")?
        .replace(
            "listen 127.0.0.1:18090;",
            &format!("listen 127.0.0.1:{};", crate::peer::FLOOR_PORT),
        )
        .replace("return 200 \"ok\\n\";", "return 410;");
    let url = format!("http://127.0.0.1:{}/", crate::peer::FLOOR_PORT);
    let nginx = crate::peer::Nginx::start(&ctx.out.join("nginx-floor"), &conf, &url).await?;
    floor(ctx, url, || crate::peer::nginx_cpu_time(&nginx.pid_file)).await
}

/// One wrk run of plain GETs of `url`, with the CPU per request that
/// `cpu` (the target's CPU time so far) counts over it.
async fn floor(ctx: &Ctx, url: String, cpu: impl Fn() -> Duration) -> anyhow::Result<Measured> {
    let before = cpu();
    let run = ctx.wrk(url, "report.lua", vec![]);
    let w = tokio::task::spawn_blocking(move || run.run()).await??;
    let used = cpu().saturating_sub(before);
    Ok(Measured {
        cpu_us_per_request: used.as_secs_f64() * 1e6 / (w.requests.max(1) as f64),
        wrk: w,
    })
}

/// The gateway's local `/healthz` (no token, no Lua, no Redis): what a
/// request costs in Pingora and the gateway's frame before any admission
/// work, the floor the admission is built on.
async fn gateway_floor(ctx: &Ctx) -> anyhow::Result<Measured> {
    floor(ctx, ctx.stack.gateway_url("/healthz"), || {
        ctx.stack.cpu_time("gateway")
    })
    .await
}

/// `pingora-floor`: a Pingora app that answers 410 and nothing else, with
/// the gateway's threads. What is left between it and the gateway's
/// `/healthz` is the gateway's own frame; between it and nginx, Pingora's.
async fn pingora_floor(ctx: &Ctx) -> anyhow::Result<Measured> {
    let pingora =
        crate::peer::PingoraFloor::start(&ctx.stack.bin_dir, ctx.stack.config.gateway.threads)
            .await?;
    floor(ctx, pingora.url.clone(), || pingora.cpu_time()).await
}

/// The median run (by req/s) of each (scenario, target), with its CPU per
/// request, and the gateway's ratios to the peer.
fn comparison_rows(runs: &BTreeMap<(&str, &str), Vec<Measured>>) -> Vec<Row> {
    let median = |v: &[Measured]| -> Option<(WrkResult, f64)> {
        let mut by_rps: Vec<&Measured> = v.iter().collect();
        by_rps.sort_by(|a, b| a.wrk.rps.total_cmp(&b.wrk.rps));
        let mut cpu: Vec<f64> = v.iter().map(|m| m.cpu_us_per_request).collect();
        cpu.sort_by(f64::total_cmp);
        let mid = by_rps.get(by_rps.len() / 2)?;
        Some((mid.wrk.clone(), cpu[cpu.len() / 2]))
    };
    let mut rows = Vec::new();
    for ((scenario, target), measured) in runs {
        let Some((w, cpu)) = median(measured) else {
            continue;
        };
        let mut row = Row::new(&format!("{scenario}: {target}"));
        row.rate = w.rps;
        row.notes.push(format!(
            "median of {} runs: {:.0} req/s, CPU {cpu:.1} µs per request (all runs: {})",
            measured.len(),
            w.rps,
            measured
                .iter()
                .map(|m| format!("{:.0} req/s {:.1} µs", m.wrk.rps, m.cpu_us_per_request))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        if *target == "gateway" {
            if let Some((p, pcpu)) = runs.get(&(*scenario, "openresty")).and_then(|m| median(m)) {
                row.notes.push(format!(
                    "gateway / openresty: req/s ×{:.2}, CPU per request ×{:.2}, p99 {:.2} / {:.2} ms",
                    w.rps / p.rps.max(1.0),
                    cpu / pcpu.max(0.001),
                    w.p99_ms,
                    p.p99_ms
                ));
            }
        }
        row.wrk = Some(w);
        rows.push(row);
    }
    rows
}

/// Stops the workers, queues `drain_orders` admitted orders (as the
/// gateway would after admitting them), starts the workers (their drain
/// pace off) and times how long MySQL takes to hold them all.
/// Redis as after these admissions (what admit.lua writes): the stock
/// taken, each buyer marked and each reservation held, so the workers
/// settle them as they would a sale's (the audit checks the stock).
async fn admitted_in_redis(
    ctx: &mut Ctx,
    sale: u64,
    messages: &[seckill_contracts::OrderMessage],
) -> anyhow::Result<()> {
    let k = ctx.keys.sale(sale);
    let _: () = redis::cmd("SET")
        .arg(k.stock())
        .arg(0)
        .query_async(&mut ctx.redis)
        .await?;
    let admitted_ms = Utc::now().timestamp_millis();
    for chunk in messages.chunks(1000) {
        let mut reservations = redis::cmd("HSET");
        reservations.arg(k.reservations());
        let mut buyers = redis::cmd("SADD");
        buyers.arg(k.buyers());
        for m in chunk {
            reservations
                .arg(m.user_id)
                .arg(format!("{}:{admitted_ms}", m.message_id));
            buyers.arg(m.user_id);
        }
        let _: () = reservations.query_async(&mut ctx.redis).await?;
        let _: () = buyers.query_async(&mut ctx.redis).await?;
    }
    Ok(())
}

async fn drain(ctx: &mut Ctx) -> anyhow::Result<Row> {
    let n = ctx.opts.drain_orders;
    let sale = ctx.create_sale(n, Duration::ZERO).await?;
    ctx.stack.stop_matching("worker-");
    let messages: Vec<seckill_contracts::OrderMessage> = (1..=u64::from(n))
        .map(|u| {
            seckill_contracts::OrderMessage::new(
                format!("drain-{sale}-{u}"),
                sale,
                u,
                Utc::now().timestamp_millis(),
            )
        })
        .collect();
    admitted_in_redis(ctx, sale, &messages).await?;
    stack::publish_orders(&ctx.stack.config, &messages).await?;
    let started = Instant::now();
    // How fast the workers can write: their drain pace off.
    let unpaced = [(
        "SECKILL__WORKER__DRAIN_ORDERS_PER_SEC".to_string(),
        "0".to_string(),
    )];
    ctx.stack.start_workers(ctx.opts.workers, &unpaced).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut committed = 0i64;
    while Instant::now() < deadline {
        committed = sqlx::query_scalar("SELECT COUNT(*) FROM orders WHERE sale_id = ?")
            .bind(sale)
            .fetch_one(&ctx.db)
            .await?;
        if committed >= i64::from(n) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let mut row = Row::new("drain");
    row.rate = committed as f64 / secs;
    row.notes.push(format!(
        "{committed} orders in {secs:.2} s with {} workers (batch_size {}, worker start-up included)",
        ctx.opts.workers, ctx.stack.config.worker.batch_size
    ));
    ctx.audit(sale, &mut row).await?;
    Ok(row)
}

/// Times a sell-out: polls the sale's stock counter `stock_key` every 20 ms
/// from now until it reads 0 (the time it took) or the sender is told to
/// stop (`None`).
pub(crate) fn watch_sell_out(
    mut redis: seckill_contracts::redis_client::RedisConn,
    stock_key: String,
) -> (
    watch::Sender<bool>,
    tokio::task::JoinHandle<Option<Duration>>,
) {
    let (tx, mut rx) = watch::channel(false);
    let watcher = tokio::spawn(async move {
        let start = Instant::now();
        loop {
            let left: Option<i64> = redis::cmd("GET")
                .arg(&stock_key)
                .query_async(&mut redis)
                .await
                .ok()
                .flatten();
            if left == Some(0) {
                return Some(start.elapsed());
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = rx.changed() => return None,
            }
        }
    });
    (tx, watcher)
}
