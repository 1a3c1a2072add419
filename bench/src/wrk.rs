//! Runs wrk and reads its numbers. Every script under `bench/wrk/` ends
//! with the same `done()` (see `bench/wrk/report.lua`), which prints one
//! `BENCH` line with the percentiles in microseconds, so parsing never
//! depends on wrk's human-readable units.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;

/// One wrk run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WrkResult {
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Connect/read/write/timeout errors (not HTTP statuses).
    pub socket_errors: u64,
    pub command: String,
    /// (percentile, latency in µs), ascending: the `BENCH_CDF` line.
    #[serde(skip)]
    pub cdf: Vec<(f64, f64)>,
}

/// How to run wrk.
pub struct WrkRun<'a> {
    pub url: String,
    pub script: &'a Path,
    pub env: Vec<(String, String)>,
    pub threads: u32,
    pub connections: u32,
    pub duration: Duration,
}

impl WrkRun<'_> {
    /// Runs wrk to the end (blocking; call from `spawn_blocking`).
    pub fn run(&self) -> anyhow::Result<WrkResult> {
        let secs = self.duration.as_secs().max(1);
        let mut cmd = Command::new("wrk");
        cmd.arg(format!("-t{}", self.threads))
            .arg(format!("-c{}", self.connections))
            .arg(format!("-d{secs}s"))
            .arg("--timeout")
            .arg("5s")
            .arg("-s")
            .arg(self.script)
            .arg(&self.url);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let shown = format!(
            "{} wrk -t{} -c{} -d{secs}s --timeout 5s -s {} {}",
            self.env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
            self.threads,
            self.connections,
            self.script.display(),
            self.url
        );
        let out = cmd.output().context("running wrk (is it installed?)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
        }
        let mut r = parse(&text)?;
        r.command = shown.trim().to_string();
        Ok(r)
    }
}

/// Reads the `BENCH` and `BENCH_CDF` lines of our `done()`.
pub fn parse(text: &str) -> anyhow::Result<WrkResult> {
    let line = text
        .lines()
        .find(|l| l.starts_with("BENCH "))
        .with_context(|| format!("no BENCH line in wrk output:\n{text}"))?;
    let mut r = WrkResult::default();
    for field in line.split_whitespace().skip(1) {
        let Some((k, v)) = field.split_once('=') else {
            continue;
        };
        let num: f64 = v
            .parse()
            .with_context(|| format!("bad number in `{field}`"))?;
        match k {
            "requests" => r.requests = num as u64,
            "duration_us" => r.seconds = num / 1e6,
            "p50" => r.p50_ms = num / 1e3,
            "p90" => r.p90_ms = num / 1e3,
            "p99" => r.p99_ms = num / 1e3,
            "p999" => r.p999_ms = num / 1e3,
            "socket_errors" => r.socket_errors = num as u64,
            _ => {}
        }
    }
    if r.seconds > 0.0 {
        r.rps = r.requests as f64 / r.seconds;
    }
    if let Some(line) = text.lines().find(|l| l.starts_with("BENCH_CDF ")) {
        r.cdf = parse_cdf(line)?;
    }
    Ok(r)
}

/// `BENCH_CDF 1=210 2=230 … 100=9000` → [(1, 210), (2, 230), …].
fn parse_cdf(line: &str) -> anyhow::Result<Vec<(f64, f64)>> {
    let mut cdf = Vec::new();
    for field in line.split_whitespace().skip(1) {
        let (p, us) = field
            .split_once('=')
            .with_context(|| format!("bad BENCH_CDF field `{field}`"))?;
        let p: f64 = p
            .parse()
            .with_context(|| format!("bad percentile `{field}`"))?;
        let us: f64 = us
            .parse()
            .with_context(|| format!("bad latency `{field}`"))?;
        cdf.push((p, us));
    }
    cdf.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(cdf)
}

/// One result for runs that shared one load at the same time (one wrk per
/// address): requests, errors and req/s add up, the length is the longest
/// run's, and the percentiles are those of all the runs' requests together
/// (see [`merged_percentile`]). A single run comes back as it is.
pub fn merge(runs: &[WrkResult]) -> WrkResult {
    if let [one] = runs {
        return one.clone();
    }
    let grids: Vec<(u64, &[(f64, f64)])> = runs
        .iter()
        .map(|r| (r.requests, r.cdf.as_slice()))
        .collect();
    // Without a grid (a script without BENCH_CDF) the slowest run's
    // percentile stands in: an upper bound, never flattering.
    let pick = |p: f64, own: fn(&WrkResult) -> f64| {
        merged_percentile(&grids, p)
            .map_or_else(|| runs.iter().map(own).fold(0.0, f64::max), |us| us / 1e3)
    };
    let percents: Vec<f64> = runs
        .iter()
        .find(|r| !r.cdf.is_empty())
        .map(|r| r.cdf.iter().map(|(p, _)| *p).collect())
        .unwrap_or_default();
    WrkResult {
        requests: runs.iter().map(|r| r.requests).sum(),
        seconds: runs.iter().map(|r| r.seconds).fold(0.0, f64::max),
        rps: runs.iter().map(|r| r.rps).sum(),
        p50_ms: pick(50.0, |r| r.p50_ms),
        p90_ms: pick(90.0, |r| r.p90_ms),
        p99_ms: pick(99.0, |r| r.p99_ms),
        p999_ms: pick(99.9, |r| r.p999_ms),
        socket_errors: runs.iter().map(|r| r.socket_errors).sum(),
        command: runs
            .iter()
            .map(|r| r.command.as_str())
            .collect::<Vec<_>>()
            .join(" & "),
        cdf: percents
            .into_iter()
            .filter_map(|p| Some((p, merged_percentile(&grids, p)?)))
            .collect(),
    }
}

/// Percentile `p` (in %) of several runs' requests together, each run
/// given as (requests, its percentile grid in µs): the smallest latency
/// at which the runs' distributions, weighted by their requests, reach
/// `p`. Between grid points a run's distribution is taken at the grid
/// point below, so the answer is exact on the grid and otherwise rounds
/// up to the next grid latency. `None` when no run has a grid.
pub fn merged_percentile(runs: &[(u64, &[(f64, f64)])], p: f64) -> Option<f64> {
    let runs: Vec<_> = runs
        .iter()
        .filter(|(n, grid)| *n > 0 && !grid.is_empty())
        .collect();
    let total: f64 = runs.iter().map(|(n, _)| *n as f64).sum();
    let mut candidates: Vec<f64> = runs
        .iter()
        .flat_map(|(_, grid)| grid.iter().map(|(_, us)| *us))
        .collect();
    candidates.sort_by(f64::total_cmp);
    // The share of one run's requests at or below `us`.
    let share = |grid: &[(f64, f64)], us: f64| {
        grid.iter()
            .filter(|(_, at)| *at <= us)
            .map(|(p, _)| *p / 100.0)
            .fold(0.0, f64::max)
    };
    let wanted = p / 100.0 - 1e-9;
    candidates
        .iter()
        .copied()
        .find(|us| {
            let below: f64 = runs
                .iter()
                .map(|(n, grid)| *n as f64 * share(grid, *us))
                .sum();
            below / total >= wanted
        })
        .or_else(|| candidates.last().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_bench_line() {
        let r = parse("Running 1s test\nBENCH requests=2000 duration_us=1000000 p50=1500 p90=2000 p99=9000 p999=12000 socket_errors=3\n").unwrap();
        assert_eq!(r.requests, 2000);
        assert!((r.rps - 2000.0).abs() < 1e-9);
        assert!((r.p99_ms - 9.0).abs() < 1e-9);
        assert_eq!(r.socket_errors, 3);
        assert!(parse("nothing here").is_err());
    }

    fn run(requests: u64, rps: f64, cdf: &[(f64, f64)]) -> WrkResult {
        let at = |p: f64| {
            cdf.iter()
                .find(|(q, _)| *q == p)
                .map_or(0.0, |(_, us)| us / 1e3)
        };
        WrkResult {
            requests,
            seconds: 15.0,
            rps,
            p50_ms: at(50.0),
            p90_ms: at(90.0),
            p99_ms: at(99.0),
            p999_ms: at(99.9),
            socket_errors: 1,
            command: format!("wrk {requests}"),
            cdf: cdf.to_vec(),
        }
    }

    #[test]
    fn reads_the_percentile_grid() {
        let text =
            "BENCH requests=10 duration_us=1000000 p50=1 p90=2 p99=3 p999=4 socket_errors=0\n\
                    BENCH_CDF 1=100 50=1000 99.9=5000 100=9000\n";
        let r = parse(text).unwrap();
        assert_eq!(
            r.cdf,
            vec![
                (1.0, 100.0),
                (50.0, 1000.0),
                (99.9, 5000.0),
                (100.0, 9000.0)
            ]
        );
        assert!(parse("BENCH requests=1 duration_us=1\nBENCH_CDF 50=x\n").is_err());
    }

    #[test]
    fn merging_two_alike_runs_keeps_their_percentiles_and_adds_the_rest() {
        let grid = [
            (50.0, 1000.0),
            (90.0, 2000.0),
            (99.0, 5000.0),
            (99.9, 8000.0),
            (100.0, 9000.0),
        ];
        let m = merge(&[run(1000, 100.0, &grid), run(1000, 110.0, &grid)]);
        assert_eq!(m.requests, 2000);
        assert!((m.rps - 210.0).abs() < 1e-9);
        assert_eq!(m.socket_errors, 2);
        assert!((m.p50_ms - 1.0).abs() < 1e-9);
        assert!((m.p99_ms - 5.0).abs() < 1e-9);
        assert!((m.p999_ms - 8.0).abs() < 1e-9);
        assert_eq!(m.command, "wrk 1000 & wrk 1000");
    }

    #[test]
    fn merged_percentiles_weigh_each_run_by_its_requests() {
        // A fast run of 900 requests (all ≤ 1 ms) and a slow one of 100
        // (all ≥ 10 ms): together the fast ones are the lowest 90 %.
        let fast: Vec<(f64, f64)> = (1..=100).map(|p| (p as f64, 1000.0)).collect();
        let slow: Vec<(f64, f64)> = (1..=100).map(|p| (p as f64, 10_000.0 + p as f64)).collect();
        let runs = [(900, fast.as_slice()), (100, slow.as_slice())];
        assert_eq!(merged_percentile(&runs, 50.0), Some(1000.0));
        assert_eq!(merged_percentile(&runs, 90.0), Some(1000.0));
        // 99 % of 1000 = 990: the fast 900 and 90 % of the slow ones.
        assert_eq!(merged_percentile(&runs, 99.0), Some(10_090.0));
        assert_eq!(merged_percentile(&runs, 100.0), Some(10_100.0));
        // A run without requests or grid does not count.
        let none: [(u64, &[(f64, f64)]); 2] = [(0, fast.as_slice()), (5, &[])];
        assert_eq!(merged_percentile(&none, 50.0), None);
    }

    #[test]
    fn without_grids_the_merge_takes_the_slower_runs_percentiles() {
        let mut a = run(10, 1.0, &[]);
        let mut b = run(10, 1.0, &[]);
        a.p99_ms = 3.0;
        b.p99_ms = 7.0;
        assert!((merge(&[a, b]).p99_ms - 7.0).abs() < 1e-9);
    }
}
