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

/// Reads the `BENCH` line of our `done()`.
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
    Ok(r)
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
}
