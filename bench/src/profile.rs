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
        let data = out.join(format!("perf-{name}.data"));
        let perf = Command::new("perf")
            .args(["record", "-q", "-F", &FREQUENCY_HZ.to_string()])
            .args(["--call-graph", &format!("dwarf,{STACK_BYTES}")])
            .args(["-p", &pid.to_string(), "-o"])
            .arg(&data)
            .args(["--", "sleep", &duration.as_secs().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record")?;
        Ok(Profile {
            name: name.to_string(),
            out: out.to_path_buf(),
            data,
            perf,
            whole_machine: false,
        })
    }

    /// Starts recording every process on the machine, leaf functions only,
    /// until [`Profile::stop`] (or [`MACHINE_LIMIT`]).
    pub fn machine(name: &str, out: &Path) -> anyhow::Result<Profile> {
        let data = out.join(format!("perf-{name}.data"));
        let perf = Command::new("perf")
            .args([
                "record",
                "-q",
                "-a",
                "-g",
                "-F",
                &FREQUENCY_HZ.to_string(),
                "-o",
            ])
            .arg(&data)
            .args(["--", "sleep", &MACHINE_LIMIT.as_secs().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record -a")?;
        Ok(Profile {
            name: name.to_string(),
            out: out.to_path_buf(),
            data,
            perf,
            whole_machine: true,
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
    /// notes get the processes and the top functions.
    fn machine_tables(self) -> anyhow::Result<Vec<String>> {
        let report = |sort: &str| -> anyhow::Result<String> {
            let out = Command::new("perf")
                .args([
                    "report",
                    "-q",
                    "--stdio",
                    "--no-children",
                    "--sort",
                    sort,
                    "-i",
                ])
                .arg(&self.data)
                .stderr(Stdio::null())
                .output()
                .context("perf report")?;
            if !out.status.success() {
                bail!("perf report failed for {}", self.name);
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let by_process = report("comm")?;
        let by_function = report("comm,dso,sym")?;
        let _ = std::fs::remove_file(&self.data);
        let text = format!(
            "# {}: the whole machine, perf -a -F {FREQUENCY_HZ}\n\n## by process\n\n{by_process}\n## by function\n\n{by_function}",
            self.name
        );
        std::fs::write(self.out.join(format!("profile-{}.txt", self.name)), text)?;
        let rows = |table: &str, n: usize| -> Vec<String> {
            table
                .lines()
                .map(str::trim)
                .filter(|l| l.contains('%'))
                .take(n)
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect()
        };
        let mut notes = vec![format!(
            "profiled (perf -a -F {FREQUENCY_HZ}, whole machine) while the buyers paid: profile-{}.txt; by process: {}",
            self.name,
            rows(&by_process, 10).join(", ")
        )];
        notes.extend(rows(&by_function, MACHINE_TOP));
        Ok(notes)
    }
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
    fn top_frames_sums_leaves_across_stacks() {
        let folded = "main;a;memcpy 30\nmain;b;memcpy 20\nmain;b;parse 50\nbroken line\n";
        let top = top_frames(folded, 2);
        assert_eq!(top, vec!["self 50.0 %: memcpy", "self 50.0 %: parse"]);
        assert_eq!(top_frames(folded, 1).len(), 1);
        assert!(top_frames("", 3).is_empty());
    }
}
