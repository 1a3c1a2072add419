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

/// The `pay` scenario's modes side by side (`None` when it did not run):
/// payments/s, latency of the pay call, and how long after an api was
/// killed mid-run everything had ended consistent.
pub fn payments_table(rows: &[Row]) -> Option<String> {
    let pay: Vec<&Row> = rows
        .iter()
        .filter(|r| r.scenario.starts_with("pay "))
        .collect();
    if pay.is_empty() {
        return None;
    }
    let mut s = String::new();
    s.push_str(
        "| mode | payments/s | p50 ms | p99 ms | MariaDB statements sent / CPU per payment | consistent after an api's kill -9 | audits |\n",
    );
    s.push_str("|---|---:|---:|---:|---:|---:|---|\n");
    for r in pay {
        let (rate, p50, p99) =
            r.wrk
                .as_ref()
                .map_or(("—".into(), "—".into(), "—".into()), |w| {
                    (
                        format!("{:.0}", w.rps),
                        format!("{:.1}", w.p50_ms),
                        format!("{:.1}", w.p99_ms),
                    )
                });
        let audit = match r.audit_ok {
            Some(true) => "clean",
            Some(false) => "**FAILED**",
            None => "—",
        };
        let db = r
            .db_per_payment
            .map_or("—".into(), |(q, us)| format!("{q:.1} / {us:.0} µs"));
        let _ = writeln!(
            s,
            "| {} | {rate} | {p50} | {p99} | {db} | {} | {audit} |",
            r.scenario.trim_start_matches("pay "),
            r.consistency_s.map_or("—".into(), |c| format!("{c:.2} s")),
        );
    }
    Some(s)
}

/// The `--cluster` comparison in one table: each scenario's single-host
/// and cluster medians side by side, with the ratio of the gateways' CPU
/// per request (the measure of issue 15); `None` when it did not run.
pub fn scale_out_table(rows: &[Row]) -> Option<String> {
    use crate::scaleout::{CLUSTER, SINGLE, TARGET_RATIO};
    let find = |name: String| rows.iter().find(|r| r.scenario == name);
    let mut s = String::new();
    s.push_str("| scenario | req/s single-host / cluster | p50 ms | p99 ms | gateway CPU/request (in the kernel) single-host | cluster (both gateways) | cluster / single-host | machine CPU/request single-host / cluster | audits |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---|\n");
    let mut any = false;
    for single in rows
        .iter()
        .filter(|r| r.scenario.ends_with(&format!(": {SINGLE}")))
    {
        let scenario = single.scenario.trim_end_matches(&format!(": {SINGLE}"));
        let Some(cluster) = find(format!("{scenario}: {CLUSTER}")) else {
            continue;
        };
        let (Some(a), Some(b), Some(ca), Some(cb)) =
            (&single.wrk, &cluster.wrk, single.cpu, cluster.cpu)
        else {
            continue;
        };
        any = true;
        let ratio = cb.gateway_us / ca.gateway_us.max(1e-9);
        let audits = match (single.audit_ok, cluster.audit_ok) {
            (Some(true), Some(true)) => "clean",
            _ => "**FAILED**",
        };
        let _ = writeln!(
            s,
            "| {scenario} | {:.0} / {:.0} | {:.2} / {:.2} | {:.2} / {:.2} | {:.1} µs ({:.1}) | {:.1} µs ({:.1}) | ×{ratio:.2}{} | {:.1} / {:.1} µs | {audits} |",
            a.rps,
            b.rps,
            a.p50_ms,
            b.p50_ms,
            a.p99_ms,
            b.p99_ms,
            ca.gateway_us,
            ca.gateway_kernel_us,
            cb.gateway_us,
            cb.gateway_kernel_us,
            if ratio <= TARGET_RATIO { "" } else { " (over the target)" },
            ca.machine_us,
            cb.machine_us,
        );
    }
    any.then(|| {
        let _ = write!(
            s,
            "\nMedians over the rounds. Target: the cluster's gateways spend at most ×{TARGET_RATIO:.2} the single-host gateway's CPU per request. \
             Machine CPU is every process and the kernel (wrk included) over the same requests; both sides' processes are up throughout.\n"
        );
        s
    })
}

/// Writes `report.md`, `report.json`, `throughput.png` and `latency.png`.
pub fn write(report: &Report, dir: &Path) -> anyhow::Result<()> {
    let o = &report.options;
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmark report {}\n", report.started);
    let _ = writeln!(md, "Machine: {}\n", report.machine);
    let _ = writeln!(
        md,
        "Run: `bench/run {}{}--users {} --stock {} --duration {} --connections {} --threads {}` \
         (wrk -t{} -c{} -d{}s per scenario; the drain scenario queues {} orders for {} workers).\n",
        o.scenarios
            .iter()
            .map(|s| format!("{s} "))
            .collect::<String>(),
        if o.cluster {
            format!("--cluster --rounds {} ", o.rounds)
        } else {
            String::new()
        },
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
    if let Some(scale_out) = scale_out_table(&report.rows) {
        md.push_str("\n## Single host against the cluster (`--cluster`)\n\n");
        md.push_str(&scale_out);
    }
    if let Some(pay) = payments_table(&report.rows) {
        md.push_str("\n## Payment modes (`pay`)\n\n");
        md.push_str(&pay);
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenarios::CpuPerRequest;
    use crate::wrk::WrkResult;

    fn row(scenario: &str, rps: f64, gateway_us: f64) -> Row {
        let mut r = Row::new(scenario);
        r.wrk = Some(WrkResult {
            rps,
            p50_ms: 1.0,
            p99_ms: 9.0,
            ..WrkResult::default()
        });
        r.cpu = Some(CpuPerRequest {
            gateway_us,
            gateway_kernel_us: gateway_us / 2.0,
            machine_us: 4.0 * gateway_us,
        });
        r.audit_ok = Some(true);
        r
    }

    #[test]
    fn the_payments_table_has_one_line_per_mode_with_every_column() {
        assert_eq!(payments_table(&[row("hot-sale", 1.0, 1.0)]), None);
        let mut tcc = Row::new("pay tcc");
        tcc.wrk = Some(crate::wrk::WrkResult {
            requests: 2000,
            seconds: 5.0,
            rps: 400.0,
            p50_ms: 3000.0,
            p90_ms: 3500.0,
            p99_ms: 4000.0,
            p999_ms: 4100.0,
            socket_errors: 0,
            command: String::new(),
            cdf: Vec::new(),
        });
        tcc.db_per_payment = Some((30.0, 2500.0));
        tcc.consistency_s = Some(6.5);
        tcc.audit_ok = Some(true);
        let table = payments_table(&[tcc]).unwrap();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        let columns = |l: &str| l.matches('|').count();
        assert_eq!(columns(lines[0]), columns(lines[1]));
        assert_eq!(columns(lines[0]), columns(lines[2]), "{table}");
        assert_eq!(
            lines[2],
            "| tcc | 400 | 3000.0 | 4000.0 | 30.0 / 2500 µs | 6.50 s | clean |"
        );
    }

    #[test]
    fn the_scale_out_table_pairs_each_scenario_and_gives_the_cpu_ratio() {
        assert_eq!(scale_out_table(&[row("hot-sale", 1.0, 1.0)]), None);
        let rows = [
            row("hot-sale: single-host", 40_000.0, 20.0),
            row("hot-sale: cluster", 30_000.0, 22.0),
            row("sold-out: single-host", 40_000.0, 20.0),
            row("sold-out: cluster", 30_000.0, 30.0),
        ];
        let table = scale_out_table(&rows).unwrap();
        let lines: Vec<&str> = table.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(
            lines[1].starts_with("| hot-sale | 40000 / 30000 |"),
            "{}",
            lines[1]
        );
        assert!(
            lines[1].contains("| 20.0 µs (10.0) | 22.0 µs (11.0) | ×1.10 |"),
            "{}",
            lines[1]
        );
        assert!(lines[2].contains("×1.50 (over the target)"), "{}", lines[2]);
        assert!(lines[2].ends_with("| clean |"));
    }
}
