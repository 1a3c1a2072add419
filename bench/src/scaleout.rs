//! `bench/run --cluster`: hot-sale and sold-out on the single-host bench
//! stack and on the scale-out topology of `scripts/cluster` (two gateways
//! behind two VIPs, Redis Cluster, a RabbitMQ cluster with quorum queues),
//! in alternating rounds, with the same wrk script, buyer count, stock,
//! threads and connections on both sides.
//!
//! Two cores cannot show what a second gateway adds, so the measure is
//! cost: the gateways' CPU per request (from `/proc`, both gateways
//! together on the cluster, over the requests they answered), next to the
//! whole machine's. The target of issue 15 is a cluster/single ratio of at
//! most [`TARGET_RATIO`]; the report says whether it was met, never tunes
//! the load to meet it.
//!
//! ```text
//! per round, per side (who goes first swaps every round):
//!   fresh sale ─▶ a hidden path per buyer ─▶ wrk per URL at once
//!   (single host: one wrk -tT -cC; cluster: one wrk per VIP, -t(T/2)
//!   -c(C/2), interleaving the same crowd) ─▶ audit ─▶ wrk again on the
//!   sold-out sale ─▶ audit
//! rows: the medians of every figure, per scenario and side
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use seckill_contracts::config::Config;
use seckill_contracts::keys::KeySchema;
use seckill_contracts::redis_client::RedisConn;
use seckill_workers::audit;
use seckill_workers::sales::{self, NewSale};
use tokio::sync::watch;

use crate::sampler::{self, Sample, StatusCounts};
use crate::scenarios::{progress, CpuPerRequest, Options, Row};
use crate::stack::{machine_busy_time, process_context_switches, process_cpu_split};
use crate::wrk::{self, WrkResult, WrkRun};
use crate::{buyers, cluster};

/// The most the cluster's gateways may spend per request, as a multiple
/// of the single-host gateway's (issue 15).
pub const TARGET_RATIO: f64 = 1.15;
/// The side names, as the rows show them.
pub const SINGLE: &str = "single-host";
pub const CLUSTER: &str = "cluster";
const SCENARIOS: [&str; 2] = ["hot-sale", "sold-out"];
/// How long an audit waits for the sale to be quiet (queue drained).
const AUDIT_WAIT: Duration = Duration::from_secs(120);
/// Time between creating a sale and its opening: paths are issued meanwhile.
const OPENS_AFTER: Duration = Duration::from_secs(3);

/// Where one side's sales run: the stores to create and audit them with,
/// the buyers, where wrk sends and which gateways answer.
pub struct Side {
    pub name: &'static str,
    pub config: Config,
    pub db: sqlx::MySqlPool,
    pub redis: RedisConn,
    pub keys: KeySchema,
    pub tokens: Arc<Vec<String>>,
    /// One wrk per URL, all at once.
    pub urls: Vec<String>,
    /// Each gateway's `/metrics`.
    pub metrics: Vec<String>,
    pub admin_token: String,
    /// The gateways' pids, for their CPU.
    pub pids: Vec<u32>,
}

impl Side {
    /// The cluster side: its own database, Redis Cluster and buyers
    /// (tokens signed with the topology's key, cached apart from the
    /// single host's).
    pub async fn cluster(topology: &cluster::Topology, users: u64) -> anyhow::Result<Side> {
        let config = topology.config.clone();
        let db = seckill_workers::connections::mysql(&config.database).await?;
        let redis = seckill_workers::connections::redis(&config).await?;
        progress(&format!("minting {users} buyer tokens for the cluster"));
        let tokens = {
            let config = config.clone();
            let dir = PathBuf::from("var/bench/cluster");
            tokio::task::spawn_blocking(move || buyers::tokens(&config, &dir, users)).await??
        };
        Ok(Side {
            name: CLUSTER,
            keys: KeySchema::new(config.redis.key_prefix.clone()),
            db,
            redis,
            tokens: Arc::new(tokens),
            urls: topology.vip_urls(),
            metrics: topology.metrics_urls(),
            admin_token: topology.admin_token.clone(),
            pids: topology.gateway_pids()?,
            config,
        })
    }

    /// CPU the side's gateways have used so far: (user, system).
    fn gateways_cpu(&self) -> (Duration, Duration) {
        self.pids
            .iter()
            .map(|pid| process_cpu_split(*pid))
            .fold((Duration::ZERO, Duration::ZERO), |(u, s), (pu, ps)| {
                (u + pu, s + ps)
            })
    }

    /// Context switches of the side's gateways' threads so far.
    fn gateways_switches(&self) -> u64 {
        self.pids
            .iter()
            .map(|pid| process_context_switches(*pid))
            .sum()
    }

    /// Fails when a gateway is gone: its CPU would silently read as zero.
    fn check_gateways(&self) -> anyhow::Result<()> {
        for pid in &self.pids {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                anyhow::bail!("{} gateway pid {pid} is gone", self.name);
            }
        }
        Ok(())
    }
}

/// One side's run of one scenario in one round.
#[derive(Debug, Clone)]
struct Measured {
    wrk: WrkResult,
    /// The gateways' answers on the seckill route, all together.
    statuses: StatusCounts,
    /// Requests each gateway answered.
    per_gateway: Vec<u64>,
    samples: Vec<Sample>,
    gateway_cpu: Duration,
    /// The part of `gateway_cpu` in the kernel.
    gateway_kernel: Duration,
    /// Context switches of the gateways' threads during the load.
    switches: u64,
    machine_cpu: Duration,
    admitted: u64,
    committed: Option<u64>,
    audit_ok: bool,
    notes: Vec<String>,
}

impl Measured {
    /// Requests the gateways answered (0: one wrk's stop cut off).
    fn answered(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(code, _)| **code != 0)
            .map(|(_, n)| n)
            .sum()
    }

    fn per_request_us(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e6 / self.answered().max(1) as f64
    }

    fn switches_per_request(&self) -> f64 {
        self.switches as f64 / self.answered().max(1) as f64
    }

    fn cpu(&self) -> CpuPerRequest {
        CpuPerRequest {
            gateway_us: self.per_request_us(self.gateway_cpu),
            gateway_kernel_us: self.per_request_us(self.gateway_kernel),
            machine_us: self.per_request_us(self.machine_cpu),
        }
    }
}

/// The fixed parts of every load.
struct Plan<'a> {
    opts: &'a Options,
    out: &'a Path,
    script: &'static Path,
}

/// Every run of one scenario on one side, by (scenario, side).
type Runs = BTreeMap<(&'static str, &'static str), Vec<Measured>>;

/// Runs `--rounds` alternating rounds of hot-sale and sold-out on both
/// sides (plus, with `--profile`, one more round with perf on one gateway
/// of each side, kept out of the medians); returns the rows, and the last
/// single-host hot sale (for the scenarios that want a sale with orders).
pub async fn compare(
    sides: &mut [Side; 2],
    opts: &Options,
    out: &Path,
) -> anyhow::Result<(Vec<Row>, Option<u64>)> {
    let plan = Plan {
        opts,
        out,
        script: Box::leak(PathBuf::from("bench/wrk/seckill.lua").into_boxed_path()),
    };
    let (runs, single_sale) = rounds(sides, &plan).await?;
    let profiled = if opts.profile {
        profiled_round(sides, &plan).await?
    } else {
        Runs::new()
    };
    Ok((rows(&runs, &profiled), single_sale))
}

/// The measured rounds; the side that goes first swaps every round, so
/// neither always runs on the warmer or the quieter machine.
async fn rounds(sides: &mut [Side; 2], plan: &Plan<'_>) -> anyhow::Result<(Runs, Option<u64>)> {
    let mut runs = Runs::new();
    let mut single_sale = None;
    let rounds = plan.opts.rounds.max(1);
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let side = &mut sides[i];
            progress(&format!(
                "--cluster round {}/{rounds}: {}",
                round + 1,
                side.name
            ));
            let (sale, measured) = sale_on(side, plan, false).await?;
            if side.name == SINGLE {
                single_sale = Some(sale);
            }
            for (scenario, m) in SCENARIOS.into_iter().zip(measured) {
                progress(&format!(
                    "{scenario} on {}: {:.0} req/s, p99 {:.2} ms, gateway CPU {:.1} µs/request, audit {}",
                    side.name,
                    m.wrk.rps,
                    m.wrk.p99_ms,
                    m.cpu().gateway_us,
                    if m.audit_ok { "clean" } else { "FAILED" }
                ));
                runs.entry((scenario, side.name)).or_default().push(m);
            }
        }
    }
    Ok((runs, single_sale))
}

/// One more round per side with perf on its first gateway: flame graphs
/// and top frames for the notes; its figures include perf's own cost.
async fn profiled_round(sides: &mut [Side; 2], plan: &Plan<'_>) -> anyhow::Result<Runs> {
    let mut runs = Runs::new();
    for side in sides.iter_mut() {
        progress(&format!("--cluster profiled round: {}", side.name));
        let (_, measured) = sale_on(side, plan, true).await?;
        for (scenario, m) in SCENARIOS.into_iter().zip(measured) {
            runs.entry((scenario, side.name)).or_default().push(m);
        }
    }
    Ok(runs)
}

/// Per scenario, the single-host row then the cluster row (with the
/// ratios), each with its profiled round's notes; a profiled round's
/// failed audit fails its row too.
fn rows(runs: &Runs, profiled: &Runs) -> Vec<Row> {
    let mut rows = Vec::new();
    for scenario in SCENARIOS {
        let single = runs.get(&(scenario, SINGLE));
        for side in [SINGLE, CLUSTER] {
            let Some(measured) = runs.get(&(scenario, side)) else {
                continue;
            };
            let mut row = median_row(scenario, side, measured);
            if let (CLUSTER, Some(single)) = (side, single) {
                row.notes.insert(0, ratio_note(single, measured));
            }
            for m in profiled.get(&(scenario, side)).into_iter().flatten() {
                row.notes
                    .push("profiled round (not in the medians):".into());
                row.notes.extend(m.notes.iter().cloned());
                if !m.audit_ok {
                    row.audit_ok = Some(false);
                }
            }
            rows.push(row);
        }
    }
    rows
}

/// A fresh sale opened under one side's load: hot-sale, then sold-out on
/// the same sale, each audited.
async fn sale_on(
    side: &mut Side,
    plan: &Plan<'_>,
    profile: bool,
) -> anyhow::Result<(u64, [Measured; 2])> {
    let stock = plan.opts.stock;
    let created = Instant::now();
    let sale = create_sale(side, stock).await?;
    let file = plan.out.join(format!("buyers-{}-{sale}.txt", side.name));
    buyers::issue_paths(&mut side.redis, &side.keys, sale, &side.tokens, &file).await?;
    tokio::time::sleep_until((created + OPENS_AFTER).into()).await;
    let users = std::fs::canonicalize(&file)?;

    let (stop, watcher) =
        crate::scenarios::watch_sell_out(side.redis.clone(), side.keys.sale(sale).stock());
    let name = side.name;
    let profile_name = |scenario: &str| profile.then(|| format!("{name}-{scenario}"));
    let mut hot = load(side, plan, &users, sale, profile_name("hot-sale")).await?;
    let _ = stop.send(true);
    match watcher.await.ok().flatten() {
        Some(t) => hot
            .notes
            .push(format!("sold out after {:.2} s", t.as_secs_f64())),
        None => hot.notes.push("did not sell out during the run".into()),
    }
    expect_admitted(&mut hot, u64::from(stock));
    audit_into(side, sale, "hot-sale", plan.out, &mut hot).await?;

    let mut sold_out = load(side, plan, &users, sale, profile_name("sold-out")).await?;
    expect_admitted(&mut sold_out, 0);
    audit_into(side, sale, "sold-out", plan.out, &mut sold_out).await?;
    Ok((sale, [hot, sold_out]))
}

async fn create_sale(side: &mut Side, stock: u32) -> anyhow::Result<u64> {
    let starts_at = Utc::now() + chrono::Duration::from_std(OPENS_AFTER)?;
    let sale = sales::create(
        &side.db,
        &mut side.redis,
        &side.keys,
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

/// Marks the run failed when the gateways admitted other than `want`.
fn expect_admitted(m: &mut Measured, want: u64) {
    if m.admitted != want {
        m.notes.push(format!("admitted {} != {want}", m.admitted));
        m.audit_ok = false;
    }
}

/// `seckill_workers::audit` of the sale on the side's stores, into `m`
/// (and `audit-<side>-<scenario>-<sale>.json` next to the report).
async fn audit_into(
    side: &mut Side,
    sale: u64,
    scenario: &str,
    out: &Path,
    m: &mut Measured,
) -> anyhow::Result<()> {
    let report = audit::run(&side.config, &side.db, &mut side.redis, sale, AUDIT_WAIT)
        .await
        .with_context(|| format!("auditing {} sale {sale}", side.name))?;
    m.committed = Some((report.orders_unpaid + report.orders_paid + report.orders_closed) as u64);
    if !report.ok {
        m.audit_ok = false;
        m.notes.extend(
            report
                .violations
                .iter()
                .map(|v| format!("audit of sale {sale}: {v}")),
        );
    }
    std::fs::write(
        out.join(format!("audit-{}-{scenario}-{sale}.json", side.name)),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(())
}

/// (threads, connections, number of its first thread) of each of `n` wrk
/// processes sharing `threads` threads and `connections` connections:
/// each gets its share (at least one thread, and a connection per thread,
/// as wrk requires), the first ones the remainder of the connections.
pub fn split(threads: u32, connections: u32, n: u32) -> Vec<(u32, u32, u32)> {
    let n = n.max(1);
    let each = (threads / n).max(1);
    (0..n)
        .map(|i| {
            let conns = connections / n + u32::from(i < connections % n);
            (each, conns.max(each), i * each)
        })
        .collect()
}

/// One load on one side: a wrk per URL at once (sharing the buyers),
/// the gateways' answers, CPU and per-second samples meanwhile.
async fn load(
    side: &Side,
    plan: &Plan<'_>,
    users: &Path,
    sale: u64,
    profile: Option<String>,
) -> anyhow::Result<Measured> {
    let http = reqwest::Client::builder().no_proxy().build()?;
    let token = side.admin_token.as_str();
    let route = Some("seckill");
    let mut before = Vec::new();
    for url in &side.metrics {
        before.push(sampler::scrape(&http, url, token, route).await?);
    }
    let (stop, rx) = watch::channel(false);
    let samplers: Vec<_> = side
        .metrics
        .iter()
        .map(|url| {
            let (url, token, rx) = (url.clone(), token.to_string(), rx.clone());
            tokio::spawn(sampler::sample_until(
                url,
                token,
                Some("seckill".into()),
                rx,
            ))
        })
        .collect();
    let perf = match (&profile, side.pids.first()) {
        (Some(name), Some(pid)) => Some(crate::profile::Profile::attach(
            *pid,
            name,
            plan.out,
            Duration::from_secs(plan.opts.duration),
        )?),
        _ => None,
    };
    let (gateway_before, machine_before) = (side.gateways_cpu(), machine_busy_time());
    let switches_before = side.gateways_switches();
    let handles: Vec<_> = wrk_runs(side, plan, users, sale)
        .into_iter()
        .map(|run| tokio::task::spawn_blocking(move || run.run()))
        .collect();
    let mut results = Vec::new();
    for h in handles {
        results.push(h.await??);
    }
    side.check_gateways()?;
    let gateway_after = side.gateways_cpu();
    let switches = side.gateways_switches().saturating_sub(switches_before);
    let gateway_kernel = gateway_after.1.saturating_sub(gateway_before.1);
    let gateway_cpu = gateway_kernel + gateway_after.0.saturating_sub(gateway_before.0);
    let machine_cpu = machine_busy_time().saturating_sub(machine_before);
    let _ = stop.send(true);
    let mut series = Vec::new();
    for s in samplers {
        series.push(s.await.unwrap_or_default());
    }
    let mut per_gateway_counts = Vec::new();
    for (url, before) in side.metrics.iter().zip(&before) {
        let after = sampler::scrape(&http, url, token, route).await?;
        per_gateway_counts.push(sampler::delta(before, &after));
    }
    let statuses = sampler::sum_counts(&per_gateway_counts);
    let mut notes = Vec::new();
    if let Some(p) = perf {
        notes.extend(p.finish()?);
    }
    Ok(Measured {
        wrk: wrk::merge(&results),
        admitted: statuses.get(&202).copied().unwrap_or(0),
        statuses,
        per_gateway: per_gateway_counts
            .iter()
            .map(|c| c.values().sum())
            .collect(),
        samples: sampler::merge_samples(&series),
        gateway_cpu,
        gateway_kernel,
        switches,
        machine_cpu,
        committed: None,
        audit_ok: true,
        notes,
    })
}

/// The wrk processes of one load: one per URL, sharing the suite's
/// threads and connections and interleaving the same buyers.
fn wrk_runs(side: &Side, plan: &Plan<'_>, users: &Path, sale: u64) -> Vec<WrkRun<'static>> {
    let opts = plan.opts;
    let shares = split(opts.threads, opts.connections, side.urls.len() as u32);
    let stride: u32 = shares.iter().map(|(t, _, _)| t).sum();
    side.urls
        .iter()
        .zip(shares)
        .map(|(url, (threads, connections, first))| WrkRun {
            url: url.clone(),
            script: plan.script,
            env: vec![
                ("BENCH_USERS".into(), users.to_string_lossy().into_owned()),
                ("SALE_ID".into(), sale.to_string()),
                ("WRK_THREADS".into(), stride.to_string()),
                ("WRK_FIRST".into(), first.to_string()),
            ],
            threads,
            connections,
            duration: Duration::from_secs(opts.duration),
        })
        .collect()
}

/// The middle value (the upper of the two middles for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// The row of one scenario on one side: the median of each figure over
/// the rounds; statuses, errors and audits over all of them.
fn median_row(scenario: &str, side: &str, runs: &[Measured]) -> Row {
    let med =
        |f: fn(&Measured) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0);
    let mut row = Row::new(&format!("{scenario}: {side}"));
    row.wrk = Some(WrkResult {
        requests: med(|m| m.wrk.requests as f64) as u64,
        seconds: med(|m| m.wrk.seconds),
        rps: med(|m| m.wrk.rps),
        p50_ms: med(|m| m.wrk.p50_ms),
        p90_ms: med(|m| m.wrk.p90_ms),
        p99_ms: med(|m| m.wrk.p99_ms),
        p999_ms: med(|m| m.wrk.p999_ms),
        socket_errors: runs.iter().map(|m| m.wrk.socket_errors).sum(),
        command: runs
            .first()
            .map(|m| m.wrk.command.clone())
            .unwrap_or_default(),
        cdf: Vec::new(),
    });
    row.cpu = Some(CpuPerRequest {
        gateway_us: med(|m| m.cpu().gateway_us),
        gateway_kernel_us: med(|m| m.cpu().gateway_kernel_us),
        machine_us: med(|m| m.cpu().machine_us),
    });
    row.statuses =
        sampler::sum_counts(&runs.iter().map(|m| m.statuses.clone()).collect::<Vec<_>>());
    row.admitted = Some(med(|m| m.admitted as f64) as u64);
    let committed: Vec<f64> = runs
        .iter()
        .filter_map(|m| m.committed)
        .map(|c| c as f64)
        .collect();
    row.committed = median(&committed).map(|c| c as u64);
    row.audit_ok = Some(runs.iter().all(|m| m.audit_ok));
    if side == SINGLE {
        row.ceiling = Some("ceiling: gateway local route".into());
    }
    let by_rps = median_run(runs);
    row.samples = by_rps.map(|m| m.samples.clone()).unwrap_or_default();
    row.notes.push(format!(
        "medians of {} rounds (sides alternate who goes first); errors and statuses are all rounds together; \
         CPU per request = CPU used during the load / requests the gateways answered",
        runs.len()
    ));
    for (i, m) in runs.iter().enumerate() {
        let cpu = m.cpu();
        row.notes.push(format!(
            "round {}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, gateway CPU {:.1} µs/request \
             ({:.1} in the kernel, {:.2} context switches), machine CPU {:.1} µs/request, \
             {} answered{}",
            i + 1,
            m.wrk.rps,
            m.wrk.p50_ms,
            m.wrk.p99_ms,
            cpu.gateway_us,
            cpu.gateway_kernel_us,
            m.switches_per_request(),
            cpu.machine_us,
            m.answered(),
            split_note(&m.per_gateway),
        ));
        row.notes
            .extend(m.notes.iter().map(|n| format!("round {}: {n}", i + 1)));
    }
    if let Some(m) = by_rps {
        row.notes
            .push(format!("command (median round): `{}`", m.wrk.command));
    }
    row
}

/// ", edge-1 N and edge-2 M" when more than one gateway answered.
fn split_note(per_gateway: &[u64]) -> String {
    if per_gateway.len() < 2 {
        return String::new();
    }
    let parts: Vec<String> = per_gateway
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let edge = cluster::EDGES.get(i).map_or("gateway", |(e, _)| e);
            format!("{edge} {n}")
        })
        .collect();
    format!(" ({})", parts.join(", "))
}

/// The run with the median req/s (its samples go into the plot).
fn median_run(runs: &[Measured]) -> Option<&Measured> {
    let mut by_rps: Vec<&Measured> = runs.iter().collect();
    by_rps.sort_by(|a, b| a.wrk.rps.total_cmp(&b.wrk.rps));
    by_rps.get(by_rps.len() / 2).copied()
}

/// The cluster's medians against the single host's, and whether the
/// target of at most [`TARGET_RATIO`] gateway CPU per request was met.
fn ratio_note(single: &[Measured], cluster: &[Measured]) -> String {
    let med = |runs: &[Measured], f: fn(&Measured) -> f64| {
        median(&runs.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0)
    };
    let ratio = |f: fn(&Measured) -> f64| med(cluster, f) / med(single, f).max(1e-9);
    let cpu = ratio(|m| m.cpu().gateway_us);
    format!(
        "cluster / single-host: gateway CPU per request ×{cpu:.2} (target ≤ ×{TARGET_RATIO:.2}: {}; \
         in user space ×{:.2}, in the kernel ×{:.2}); the gateways' context switches per request \
         {:.2} against {:.2}; machine CPU per request ×{:.2}, req/s ×{:.2}, p50 ×{:.2}, p99 ×{:.2}",
        if cpu <= TARGET_RATIO { "met" } else { "NOT met" },
        ratio(|m| m.cpu().gateway_us - m.cpu().gateway_kernel_us),
        ratio(|m| m.cpu().gateway_kernel_us),
        med(cluster, Measured::switches_per_request),
        med(single, Measured::switches_per_request),
        ratio(|m| m.cpu().machine_us),
        ratio(|m| m.wrk.rps),
        ratio(|m| m.wrk.p50_ms),
        ratio(|m| m.wrk.p99_ms),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_wrks_share_the_threads_and_connections() {
        assert_eq!(split(2, 128, 1), vec![(2, 128, 0)]);
        assert_eq!(split(2, 128, 2), vec![(1, 64, 0), (1, 64, 1)]);
        assert_eq!(split(4, 101, 2), vec![(2, 51, 0), (2, 50, 2)]);
        // Never fewer than one thread, nor fewer connections than threads.
        assert_eq!(split(1, 1, 2), vec![(1, 1, 0), (1, 1, 1)]);
    }

    #[test]
    fn the_median_is_the_middle_value() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0]), Some(4.0));
        assert_eq!(median(&[]), None);
    }
}
