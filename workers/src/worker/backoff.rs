//! The one backoff curve of the worker's retry loops: broker reconnects,
//! requeues after a transient failure, retried close messages.

use std::time::Duration;

/// Waits that double with each consecutive failure, from `min` up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) const fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max }
    }

    /// The wait after the `step`-th consecutive failure (0 = the first):
    /// `min · 2^step`, at most `max`.
    pub(crate) fn delay(&self, step: u32) -> Duration {
        self.min.saturating_mul(1u32 << step.min(16)).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(B.delay(0), Duration::from_millis(200));
        assert_eq!(B.delay(1), Duration::from_millis(400));
        assert!(B.delay(3) > B.delay(1));
        assert_eq!(B.delay(30), Duration::from_secs(10));
        assert_eq!(B.delay(u32::MAX), Duration::from_secs(10));
    }
}
