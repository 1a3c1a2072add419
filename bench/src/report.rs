//! `report.md` and the PNG plots of one suite run.
//!
//! Every figure sits next to the ceiling measured in the same run, so a
//! reader compares ratios on this machine rather than absolutes that drift
//! with the hardware and whatever else it is doing.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use plotters::style::register_font;
use serde::Serialize;

use crate::scenarios::{Options, Row};

/// Everything a report shows.
#[derive(Debug, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    #[serde(skip)]
    pub options: Options,
    pub machine: String,
    pub started: String,
}

/// Cores, memory and kernel of this machine, for the report header.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |p| p.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_string()))
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "{cores} cores ({cpu}), {:.1} GiB RAM; wrk, the gateway, 2 api, the workers, MariaDB, Redis and RabbitMQ all share it",
        mem_kib as f64 / 1024.0 / 1024.0
    )
}

fn ceiling_rate(rows: &[Row], name: &str) -> Option<f64> {
    rows.iter().find(|r| r.scenario == name).map(|r| r.rate)
}

fn fmt_opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("—".into(), |v| v.to_string())
}

/// The markdown table (also printed into the README).
pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str("| scenario | req/s | p50 ms | p99 ms | p99.9 ms | errors | admitted | committed | audit | vs ceiling |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---|---|\n");
    for r in rows {
        let (rps, p50, p99, p999, errors) = match &r.wrk {
            Some(w) => {
                let http5xx: u64 = r
                    .statuses
                    .iter()
                    .filter(|(c, _)| **c >= 500)
                    .map(|(_, n)| n)
                    .sum();
                (
                    format!("{:.0}", w.rps),
                    format!("{:.2}", w.p50_ms),
                    format!("{:.2}", w.p99_ms),
                    format!("{:.2}", w.p999_ms),
                    (w.socket_errors + http5xx).to_string(),
                )
            }
            None => (
                format!("{:.0}", r.rate),
                "—".into(),
                "—".into(),
                "—".into(),
                "—".into(),
            ),
        };
        let ratio = match (&r.ceiling, &r.wrk) {
            (Some(c), Some(w)) => ceiling_rate(rows, c)
                .filter(|c| *c > 0.0)
                .map_or("—".into(), |c| {
                    format!("{:.0} % of {}", 100.0 * w.rps / c, c.round())
                }),
            _ => "—".into(),
        };
        let audit = match r.audit_ok {
            Some(true) => "clean",
            Some(false) => "**FAILED**",
            None => "—",
        };
        let _ = writeln!(
            s,
            "| {} | {rps} | {p50} | {p99} | {p999} | {errors} | {} | {} | {audit} | {ratio} |",
            r.scenario,
            fmt_opt(r.admitted),
            fmt_opt(r.committed),
        );
    }
    s
}

/// Writes `report.md`, `report.json`, `throughput.png` and `latency.png`.
pub fn write(report: &Report, dir: &Path) -> anyhow::Result<()> {
    let o = &report.options;
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmark report {}\n", report.started);
    let _ = writeln!(md, "Machine: {}\n", report.machine);
    let _ = writeln!(
        md,
        "Run: `bench/run {}--users {} --stock {} --duration {} --connections {} --threads {}` \
         (wrk -t{} -c{} -d{}s per scenario; the drain scenario queues {} orders for {} workers).\n",
        o.scenarios
            .iter()
            .map(|s| format!("{s} "))
            .collect::<String>(),
        o.users,
        o.stock,
        o.duration,
        o.connections,
        o.threads,
        o.threads,
        o.connections,
        o.duration,
        o.drain_orders,
        o.workers
    );
    md.push_str(&table(&report.rows));
    md.push_str("\nerrors = socket errors + 5xx answers. Refusals by design (409/410/429) are not errors; the status counts per scenario are below.\n\n");
    md.push_str("![throughput](throughput.png)\n\n![latency](latency.png)\n\n## Details\n\n");
    for r in &report.rows {
        let _ = writeln!(md, "### {}\n", r.scenario);
        if let Some(w) = &r.wrk {
            let _ = writeln!(md, "- command: `{}`", w.command);
            let _ = writeln!(md, "- requests: {} in {:.1} s", w.requests, w.seconds);
        }
        if !r.statuses.is_empty() {
            let _ = writeln!(md, "- gateway statuses: {:?}", r.statuses);
        }
        for n in &r.notes {
            let _ = writeln!(md, "- {n}");
        }
        md.push('\n');
    }
    std::fs::write(dir.join("report.md"), md)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    if let Err(e) = plots(&report.rows, dir) {
        eprintln!("plots not drawn: {e}");
    }
    Ok(())
}

const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn plots(rows: &[Row], dir: &Path) -> anyhow::Result<()> {
    let font = FONT_PATHS
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .ok_or_else(|| anyhow::anyhow!("no DejaVuSans.ttf (apt-get install fonts-dejavu-core)"))?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("cannot load the font"))?;

    let series: Vec<&Row> = rows.iter().filter(|r| !r.samples.is_empty()).collect();
    let max_t = series
        .iter()
        .flat_map(|r| r.samples.iter().map(|s| s.t_secs))
        .fold(1.0f64, f64::max);
    let max_rps = series
        .iter()
        .flat_map(|r| r.samples.iter().map(|s| s.rps))
        .fold(1.0f64, f64::max);
    {
        let file = dir.join("throughput.png");
        let root = BitMapBackend::new(&file, (1000, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Gateway throughput over time", ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..max_t, 0.0..max_rps * 1.1)?;
        chart
            .configure_mesh()
            .x_desc("seconds into the scenario")
            .y_desc("responses / s")
            .draw()?;
        for (i, r) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    r.samples.iter().map(|s| (s.t_secs, s.rps)),
                    color.stroke_width(2),
                ))?
                .label(r.scenario.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    {
        let with_latency: Vec<&Row> = rows.iter().filter(|r| r.wrk.is_some()).collect();
        let max_ms = with_latency
            .iter()
            .filter_map(|r| r.wrk.as_ref().map(|w| w.p999_ms))
            .fold(1.0f64, f64::max);
        let file = dir.join("latency.png");
        let root = BitMapBackend::new(&file, (1000, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let labels = ["p50", "p90", "p99", "p99.9"];
        let mut chart = ChartBuilder::on(&root)
            .caption("Latency percentiles per scenario", ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0f64..3.0f64, (0.05f64..max_ms * 1.5).log_scale())?;
        chart
            .configure_mesh()
            .x_labels(4)
            .x_label_formatter(&|x| {
                labels
                    .get(x.round() as usize)
                    .map_or(String::new(), |s| s.to_string())
            })
            .y_desc("milliseconds (log)")
            .draw()?;
        for (i, r) in with_latency.iter().enumerate() {
            let Some(w) = &r.wrk else { continue };
            let color = Palette99::pick(i).to_rgba();
            let pts = [w.p50_ms, w.p90_ms, w.p99_ms, w.p999_ms]
                .into_iter()
                .enumerate()
                .map(|(x, y)| (x as f64, y.max(0.05)));
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(r.scenario.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(())
}
