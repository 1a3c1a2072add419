//! CPU-heavy request work: argon2id password hashing and captcha rendering.
//!
//! Both must stay off the async workers, so they run on Tokio's blocking
//! pool. That pool grows to hundreds of threads, though: at a sale's opening
//! a burst of logins or captcha requests would start one argon2 hash (19 MiB
//! of memory each) or one PNG render per request, all at once, and the
//! runnable threads would crowd out everything else on the machine: the
//! api's own Redis and MySQL replies, and the gateway and Redis processes
//! beside it. [`CpuWork`] lets at most `api.cpu_jobs` such jobs run at a
//! time; the others wait their turn in arrival order (Tokio's semaphore is
//! fair). A burst then costs those requests queueing latency, visible as
//! `seckill_api_cpu_jobs_waiting`, instead of costing everyone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::metrics;

/// Why a CPU job did not produce its result.
#[derive(Debug, thiserror::Error)]
pub enum CpuWorkError {
    /// The job panicked; the panic is in the log.
    #[error("cpu job failed: {0}")]
    Panicked(#[from] tokio::task::JoinError),
    /// The limiter was closed (the process is shutting down).
    #[error("cpu job refused: shutting down")]
    Closed,
}

/// The bounded runner for CPU-bound jobs; one per process, cheap to clone.
#[derive(Debug, Clone)]
pub struct CpuWork {
    permits: Arc<Semaphore>,
    limit: usize,
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl CpuWork {
    /// At most `limit` jobs at once; 0 means one per available core.
    pub fn new(limit: usize) -> CpuWork {
        let limit = if limit == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            limit
        };
        CpuWork {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            running: Arc::default(),
            peak: Arc::default(),
        }
    }

    /// How many jobs may run at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The most jobs that ever ran at once in this process: lets tests
    /// (and an operator sizing `api.cpu_jobs`) see the bound was used and
    /// held.
    pub fn peak_running(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Runs `job` on the blocking pool once a slot is free.
    pub async fn run<T, F>(&self, job: F) -> Result<T, CpuWorkError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let permit = {
            let _waiting = metrics::CpuJobWaiting::enter();
            self.permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| CpuWorkError::Closed)?
        };
        let (running, peak) = (self.running.clone(), self.peak.clone());
        let result = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _running = Running::enter(&running, &peak);
            job()
        })
        .await?;
        Ok(result)
    }
}

/// One job counted as running while alive, so a panicking job is uncounted
/// too.
struct Running<'a>(&'a AtomicUsize);

impl<'a> Running<'a> {
    fn enter(running: &'a AtomicUsize, peak: &AtomicUsize) -> Running<'a> {
        let now = running.fetch_add(1, Ordering::Relaxed) + 1;
        peak.fetch_max(now, Ordering::Relaxed);
        Running(running)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_runs_more_than_the_limit_at_once() {
        let work = CpuWork::new(3);
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let jobs = (0..24).map(|i| {
            let (work, running, peak) = (work.clone(), running.clone(), peak.clone());
            tokio::spawn(async move {
                work.run(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(10));
                    running.fetch_sub(1, Ordering::SeqCst);
                    i * 2
                })
                .await
            })
        });
        let results: Vec<usize> = futures::future::join_all(jobs)
            .await
            .into_iter()
            .map(|r| r.unwrap().unwrap())
            .collect();
        assert_eq!(results, (0..24).map(|i| i * 2).collect::<Vec<_>>());
        assert_eq!(
            peak.load(Ordering::SeqCst),
            3,
            "the limit is used and never exceeded"
        );
    }

    #[tokio::test]
    async fn a_panicking_job_is_an_error_and_frees_its_slot() {
        let work = CpuWork::new(1);
        let err = work.run(|| panic!("boom")).await.unwrap_err();
        assert!(matches!(err, CpuWorkError::Panicked(_)), "{err}");
        assert_eq!(work.run(|| 7).await.unwrap(), 7);
    }

    #[test]
    fn zero_means_one_per_core() {
        assert!(CpuWork::new(0).limit() >= 1);
        assert_eq!(CpuWork::new(5).limit(), 5);
    }
}
