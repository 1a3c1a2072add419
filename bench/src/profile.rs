//! `--profile`: where the gateway's CPU goes during a scenario, as a flame
//! graph next to the report and the top frames in its notes.
//!
//! ```text
//! Profile::attach(gateway pid)   perf record -g (DWARF unwinding) for the
//!                                scenario's load, at a modest rate
//!        … the scenario's wrk run …
//! Profile::finish                perf script | inferno-collapse-perf
//!                                  → profile-<name>.folded
//!                                inferno-flamegraph → flame-<name>.svg
//!                                the folded stacks' leaf frames → top-N
//! ```
//!
//! `pay --profile` records the whole machine instead (every process and
//! the kernel, [`Profile::machine`]) while one round's buyers pay: a
//! payment's cost is spread over the gateway, the apis, the wallet and
//! MariaDB, and the useful answer is which of them, in which functions.
//! That recording keeps no call graphs (leaf functions only), so it is
//! cheap enough for a run lasting a second, and it is stopped when the
//! payments are answered ([`Profile::stop`]).
//!
//! DWARF unwinding because release builds keep no frame pointers; the
//! release profile's line tables are enough for function names. A
//! profiled run is slower than an unprofiled one (perf copies each
//! sample's stack), so its figures are only for finding costs: the
//! report's numbers come from runs without `--profile`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

/// Samples per second: enough for a 15 s run to show 1 % costs, few
/// enough that perf itself stays a small share of the two cores.
const FREQUENCY_HZ: u32 = 499;
/// Stack bytes perf copies per sample for DWARF unwinding.
const STACK_BYTES: u32 = 32_768;
/// Frames listed in the report notes.
const TOP_FRAMES: usize = 12;
/// Frames narrower than this (of the graph's 1200) are left out of the
/// SVG: they are unreadable anyway, and keeping them makes it megabytes.
const MIN_WIDTH_PX: f64 = 0.5;

/// A perf recording of one process for one scenario, or of the whole
/// machine for one payment round.
pub struct Profile {
    name: String,
    out: PathBuf,
    data: PathBuf,
    perf: Child,
    whole_machine: bool,
    /// Whole machine: names for the stack's pids in the tables (`api-0`
    /// rather than `tokio-rt-worker`, which every Rust process shares).
    labels: Vec<(u32, String)>,
}

/// The longest a whole-machine recording runs when nobody stops it.
const MACHINE_LIMIT: Duration = Duration::from_secs(120);
/// Lines of the per-function table kept in a whole-machine profile's notes.
const MACHINE_TOP: usize = 25;

/// Installs what `--profile` needs when missing: perf (Debian's
/// linux-perf) and inferno's collapse and flame graph tools (crates.io).
pub fn check_tools() -> anyhow::Result<()> {
    for tool in ["perf", "inferno-collapse-perf", "inferno-flamegraph"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()?
            .success();
        if !found {
            bail!("--profile needs {tool}; bench/run installs it, or see bench/README.md");
        }
    }
    Ok(())
}

impl Profile {
    /// Starts recording `pid` for `duration` (perf stops by itself, so a
    /// failed scenario cannot leave it running).
    pub fn attach(pid: u32, name: &str, out: &Path, duration: Duration) -> anyhow::Result<Profile> {
        let scope = [
            "--call-graph".to_string(),
            format!("dwarf,{STACK_BYTES}"),
            "-p".to_string(),
            pid.to_string(),
        ];
        Profile::record(name, out, &scope, duration, None)
    }

    /// Starts recording every process on the machine, leaf functions only,
    /// until [`Profile::stop`] (or [`MACHINE_LIMIT`]); `labels` name the
    /// pids the tables should show by name.
    pub fn machine(name: &str, out: &Path, labels: Vec<(u32, String)>) -> anyhow::Result<Profile> {
        Profile::record(name, out, &["-a".to_string()], MACHINE_LIMIT, Some(labels))
    }

    /// `perf record` at [`FREQUENCY_HZ`] over `scope` (what to record and
    /// how) into `perf-<name>.data`, for at most `limit`; `machine_labels`
    /// for a whole-machine recording (see [`Profile::machine`]).
    fn record(
        name: &str,
        out: &Path,
        scope: &[String],
        limit: Duration,
        machine_labels: Option<Vec<(u32, String)>>,
    ) -> anyhow::Result<Profile> {
        let data = out.join(format!("perf-{name}.data"));
        let perf = Command::new("perf")
            .args(["record", "-q", "-F", &FREQUENCY_HZ.to_string()])
            .args(scope)
            .arg("-o")
            .arg(&data)
            .args(["--", "sleep", &limit.as_secs().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting perf record {}", scope.join(" ")))?;
        Ok(Profile {
            name: name.to_string(),
            out: out.to_path_buf(),
            data,
            perf,
            whole_machine: machine_labels.is_some(),
            labels: machine_labels.unwrap_or_default(),
        })
    }

    /// Ends the recording now (perf writes what it has on SIGINT).
    pub fn stop(&self) -> anyhow::Result<()> {
        let ok = Command::new("kill")
            .args(["-INT", &self.perf.id().to_string()])
            .status()?
            .success();
        if !ok {
            bail!("could not stop perf for {}", self.name);
        }
        Ok(())
    }

    /// Waits for perf, writes the folded stacks and the flame graph, drops
    /// the raw data (hundreds of MB) and returns the report's notes.
    pub fn finish(mut self) -> anyhow::Result<Vec<String>> {
        self.perf.wait().context("waiting for perf record")?;
        if self.whole_machine {
            return self.machine_tables();
        }
        let folded = self.out.join(format!("profile-{}.folded", self.name));
        let svg = self.out.join(format!("flame-{}.svg", self.name));
        let script = format!(
            "perf script -i '{}' 2>/dev/null | inferno-collapse-perf --all > '{}' && \
             inferno-flamegraph --minwidth {MIN_WIDTH_PX} --title 'seckill-gateway: {}' < '{}' > '{}'",
            self.data.display(),
            folded.display(),
            self.name,
            folded.display(),
            svg.display()
        );
        let ok = Command::new("sh").args(["-c", &script]).status()?.success();
        let _ = std::fs::remove_file(&self.data);
        if !ok {
            bail!("perf script or inferno failed for {}", self.name);
        }
        let stacks = std::fs::read_to_string(&folded)?;
        let mut notes = vec![format!(
            "profiled (perf -F {FREQUENCY_HZ} DWARF): flame-{}.svg; these figures include perf's own cost",
            self.name
        )];
        notes.extend(top_frames(&stacks, TOP_FRAMES));
        Ok(notes)
    }
}

impl Profile {
    /// A whole-machine recording as two tables in `profile-<name>.txt`:
    /// the share of each process, and of each process's functions; the
    /// notes get the processes and the top functions. perf names a sample
    /// by its thread, so the stack's threads are mapped to its process
    /// names here, while they still run; any other thread goes by its
    /// command name.
    fn machine_tables(self) -> anyhow::Result<Vec<String>> {
        let out = Command::new("perf")
            .args(["report", "-q", "--stdio", "--no-children", "-t", "|"])
            .args(["--sort", "pid,dso,sym", "-i"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .context("perf report")?;
        let _ = std::fs::remove_file(&self.data);
        if !out.status.success() {
            bail!("perf report failed for {}", self.name);
        }
        let threads = thread_labels(&self.labels);
        let rows = machine_rows(&String::from_utf8_lossy(&out.stdout), &threads);
        let by_process = shares(rows.iter().map(|(p, _, pct)| (p.clone(), *pct)));
        let by_function = shares(
            rows.into_iter()
                .map(|(p, f, pct)| (format!("{p} {f}"), pct)),
        );
        let table = |rows: &[(String, f64)]| -> Vec<String> {
            rows.iter()
                .map(|(k, pct)| format!("{pct:6.2} %  {k}"))
                .collect()
        };
        let text = format!(
            "# {}: the whole machine, perf -a -F {FREQUENCY_HZ}\n\n## by process\n\n{}\n\n## by function\n\n{}\n",
            self.name,
            table(&by_process).join("\n"),
            table(&by_function).join("\n")
        );
        std::fs::write(self.out.join(format!("profile-{}.txt", self.name)), text)?;
        let top: Vec<String> = by_process
            .iter()
            .take(10)
            .map(|(p, pct)| format!("{p} {pct:.1} %"))
            .collect();
        let mut notes = vec![format!(
            "profiled (perf -a -F {FREQUENCY_HZ}, whole machine) while the buyers paid: profile-{}.txt; by process: {}",
            self.name,
            top.join(", ")
        )];
        notes.extend(table(&by_function).into_iter().take(MACHINE_TOP));
        Ok(notes)
    }
}

/// Each thread of the named processes, by thread id.
fn thread_labels(labels: &[(u32, String)]) -> HashMap<u32, String> {
    let mut threads = HashMap::new();
    for (pid, label) in labels {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) {
                threads.insert(tid, label.clone());
            }
        }
    }
    threads
}

/// perf's `overhead|tid:comm|dso|sym` rows as (process, "dso sym", %).
fn machine_rows(report: &str, threads: &HashMap<u32, String>) -> Vec<(String, String, f64)> {
    report
        .lines()
        .filter_map(|line| {
            let mut cols = line.split('|').map(str::trim);
            let pct: f64 = cols.next()?.trim_end_matches('%').parse().ok()?;
            let (tid, comm) = cols.next()?.split_once(':')?;
            let process = tid
                .parse::<u32>()
                .ok()
                .and_then(|t| threads.get(&t).cloned())
                .unwrap_or_else(|| comm.to_string());
            let function = format!("{} {}", cols.next()?, cols.next()?);
            Some((process, function, pct))
        })
        .collect()
}

/// Sums the shares by key, largest first.
fn shares(rows: impl Iterator<Item = (String, f64)>) -> Vec<(String, f64)> {
    let mut by: HashMap<String, f64> = HashMap::new();
    for (key, pct) in rows {
        *by.entry(key).or_default() += pct;
    }
    let mut v: Vec<_> = by.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// The leaf frames with the most samples ("self time"), as percentages of
/// all samples, from inferno's folded format (`a;b;c count`).
pub fn top_frames(folded: &str, n: usize) -> Vec<String> {
    let mut by_leaf: HashMap<&str, u64> = HashMap::new();
    let mut total = 0u64;
    for line in folded.lines() {
        let Some((stack, count)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(count) = count.parse::<u64>() else {
            continue;
        };
        let leaf = stack.rsplit(';').next().unwrap_or(stack);
        *by_leaf.entry(leaf).or_default() += count;
        total += count;
    }
    let mut leaves: Vec<_> = by_leaf.into_iter().collect();
    leaves.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    leaves
        .into_iter()
        .take(n)
        .map(|(leaf, count)| {
            format!(
                "self {:.1} %: {leaf}",
                count as f64 * 100.0 / total.max(1) as f64
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_rows_go_by_process_and_sum() {
        let report = " 2.90%  |   11:edge proxy |[kernel.kallsyms] |[k] clear_page_erms\n\
                      1.50%  |   12:tokio-rt-worker |seckill-api |[.] parse\n\
                      0.50%  |   13:tokio-rt-worker |seckill-api |[.] parse\n\
                      0.25%  |   99:mariadbd |mariadbd |[.] malloc\n\
                      broken line\n";
        let threads = HashMap::from([
            (11, "gateway".to_string()),
            (12, "api-0".to_string()),
            (13, "api-0".to_string()),
        ]);
        let rows = machine_rows(report, &threads);
        assert_eq!(rows.len(), 4);
        let by_process = shares(rows.iter().map(|(p, _, pct)| (p.clone(), *pct)));
        assert_eq!(
            by_process,
            vec![
                ("gateway".to_string(), 2.9),
                ("api-0".to_string(), 2.0),
                ("mariadbd".to_string(), 0.25)
            ]
        );
        let by_function = shares(
            rows.into_iter()
                .map(|(p, f, pct)| (format!("{p} {f}"), pct)),
        );
        assert_eq!(
            by_function[1],
            ("api-0 seckill-api [.] parse".to_string(), 2.0)
        );
    }

    #[test]
    fn top_frames_sums_leaves_across_stacks() {
        let folded = "main;a;memcpy 30\nmain;b;memcpy 20\nmain;b;parse 50\nbroken line\n";
        let top = top_frames(folded, 2);
        assert_eq!(top, vec!["self 50.0 %: memcpy", "self 50.0 %: parse"]);
        assert_eq!(top_frames(folded, 1).len(), 1);
        assert!(top_frames("", 3).is_empty());
    }
}
