//! Local token buckets: the gateway's first, free line of defence. A request
//! that a bucket refuses never costs a Redis round trip.
//!
//! Each bucket is GCRA (the "theoretical arrival time" form of a token
//! bucket) in one `AtomicU64`, updated with compare-and-swap: no lock, so
//! every proxy thread can take from the same hot bucket (one sale's) without
//! contending on a mutex. Buckets are created on first use per name and
//! forgotten when idle, so per-user buckets cannot grow without bound.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One GCRA bucket.
#[derive(Debug)]
pub struct Bucket {
    /// Nanoseconds after `epoch` at which the bucket is next fully idle.
    tat: AtomicU64,
    /// Nanoseconds per token.
    interval: u64,
    /// How far ahead of now `tat` may run: (burst - 1) intervals.
    tolerance: u64,
}

impl Bucket {
    /// `rate` tokens per second, up to `burst` at once.
    pub fn new(rate: f64, burst: u32) -> Bucket {
        let interval = (1e9 / rate.max(1e-3)) as u64;
        Bucket {
            tat: AtomicU64::new(0),
            interval: interval.max(1),
            tolerance: interval.saturating_mul(u64::from(burst.max(1) - 1)),
        }
    }

    /// Takes one token at time `now` (ns since the shared epoch).
    pub fn try_take(&self, now: u64) -> bool {
        let mut current = self.tat.load(Ordering::Relaxed);
        loop {
            let tat = current.max(now);
            if tat - now > self.tolerance {
                return false;
            }
            match self.tat.compare_exchange_weak(
                current,
                tat + self.interval,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    fn same_shape(&self, rate: f64, burst: u32) -> bool {
        let other = Bucket::new(rate, burst);
        other.interval == self.interval && other.tolerance == self.tolerance
    }
}

/// All named buckets of this gateway process.
pub struct TokenBuckets {
    epoch: Instant,
    buckets: moka::sync::Cache<String, Arc<Bucket>>,
}

impl TokenBuckets {
    /// At most `capacity` buckets; one idle for `idle` is dropped.
    pub fn new(capacity: u64, idle: Duration) -> TokenBuckets {
        TokenBuckets {
            epoch: Instant::now(),
            buckets: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_idle(idle)
                .build(),
        }
    }

    /// Takes a token from bucket `name` (created with `rate`/`burst` on first
    /// use; a rule that changes the numbers gets a fresh bucket).
    pub fn take(&self, name: &str, rate: f64, burst: u32) -> bool {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let bucket = match self.buckets.get(name) {
            Some(b) if b.same_shape(rate, burst) => b,
            _ => {
                let b = Arc::new(Bucket::new(rate, burst));
                self.buckets.insert(name.to_string(), b.clone());
                b
            }
        };
        bucket.try_take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn burst_then_rate() {
        let b = Bucket::new(10.0, 5);
        let t0 = 10 * SEC;
        let taken = (0..20).filter(|_| b.try_take(t0)).count();
        assert_eq!(taken, 5, "burst");
        assert!(
            !b.try_take(t0 + SEC / 20),
            "half an interval later: still empty"
        );
        assert!(b.try_take(t0 + SEC / 10), "one interval later: one token");
        assert!(!b.try_take(t0 + SEC / 10));
        // After a long idle, only the burst again.
        let later = t0 + 100 * SEC;
        assert_eq!((0..20).filter(|_| b.try_take(later)).count(), 5);
    }

    #[test]
    fn concurrent_takes_never_exceed_burst() {
        let b = Arc::new(Bucket::new(1.0, 100));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || (0..1000).filter(|_| b.try_take(SEC)).count())
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 100);
    }

    #[test]
    fn named_buckets_are_independent() {
        let buckets = TokenBuckets::new(100, Duration::from_secs(60));
        assert!(buckets.take("a", 1.0, 1));
        assert!(!buckets.take("a", 1.0, 1));
        assert!(buckets.take("b", 1.0, 1));
    }
}
