//! The benchmark suite behind `bench/run`: one command that starts a bench
//! stack (its own database, key prefix and queues, never the demo's),
//! prepares buyers, runs wrk scenarios, audits every sale, measures the
//! ceilings of this machine in the same run, and writes a report with plots.
//!
//! Flow: [`stack`] starts the release binaries → [`buyers`] mints tokens and
//! pre-issues hidden paths → [`scenarios`] drive [`wrk`] while [`sampler`]
//! scrapes the gateway's metrics every second (and, with `--dashboards`,
//! [`dashboards`] poll the `/ops` figures) → `seckill_workers::audit`
//! checks the invariants → [`report`] writes `report.md` and the PNGs;
//! with `--profile`, [`profile`] records the gateway with perf meanwhile.
//! With `--cluster`, [`scaleout`] runs hot-sale and sold-out on this stack
//! and through the VIPs of the [`cluster`] topology in alternating rounds.

pub mod buyers;
pub mod cluster;
pub mod dashboards;
pub mod payments;
pub mod peer;
pub mod profile;
pub mod report;
pub mod sampler;
pub mod scaleout;
pub mod scenarios;
pub mod stack;
pub mod wrk;
