//! Peak shaving: how fast a worker process hands orders to MySQL.
//!
//! A sell-out admits its whole stock within about a second. Written as fast
//! as they arrive, those orders put the database, the broker's deliveries
//! and the workers to work in the very second the edge is busiest, and on
//! machines the edge shares that is where its tail latency comes from. With
//! `worker.drain_orders_per_sec` set, the process's consumers take turns on
//! one schedule: a batch of `n` may be written at its turn, and the next
//! turn comes `n / rate` seconds later. The queue holds the rest (durable,
//! unacked deliveries), which is what it is for.
//!
//! The first batch goes at once; there is no saved-up burst beyond one
//! batch, so the rate holds over any window longer than a batch's share.
//!
//! The pace is bounded: no batch waits past `worker.drain_pace_max_delay_ms`
//! after the admission of its oldest order (the gateway's
//! `admitted_at_ms`). A batch that reaches that bound goes then, and the
//! schedule goes on from there, so a burst is shaped while it is young and
//! the rest of it drains at full speed; and no order outwaits its
//! reservation, whatever the stock, the rate and the number of workers.
//! (A worker whose clock runs behind the gateway's sees orders younger
//! than they are and holds them up to that skew longer.)
//!
//! ```text
//!  batch of n, oldest admitted at t0
//!     turn  = max(next, now)           the schedule's slot
//!     go at = min(turn, t0 + max_delay) never later than the bound
//!     next  = go at + n / rate
//! ```

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::Instant;

/// The shared schedule of a process's consumers.
#[derive(Debug)]
pub struct DrainPace {
    /// Time each order costs of the schedule; `None`: no pace.
    per_order: Option<Duration>,
    /// The most a batch waits after its oldest order's admission.
    max_delay: Duration,
    /// When the next batch may be written.
    next: Mutex<Option<Instant>>,
}

impl DrainPace {
    /// A pace of `orders_per_sec` (0: none) that holds no order back more
    /// than `max_delay` after its admission.
    pub fn new(orders_per_sec: u32, max_delay: Duration) -> DrainPace {
        DrainPace {
            per_order: (orders_per_sec > 0).then(|| Duration::from_secs(1) / orders_per_sec),
            max_delay,
            next: Mutex::new(None),
        }
    }

    /// Waits for the turn of a batch of `orders` whose oldest was admitted
    /// at `oldest_admitted_ms` (Unix ms; `None`: unknown, no bound); false
    /// when `stop` turned true meanwhile (the caller leaves the batch
    /// unacked: the broker hands it to the next consumer).
    pub async fn turn(
        &self,
        orders: usize,
        oldest_admitted_ms: Option<i64>,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        if self.per_order.is_none() {
            return true;
        }
        let bound = oldest_admitted_ms.map(|ms| self.bound(ms));
        let Some(at) = self.book(orders, bound) else {
            return true;
        };
        if at <= Instant::now() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(at) => true,
            _ = stop.wait_for(|stopped| *stopped) => false,
        }
    }

    /// The instant a batch whose oldest order was admitted at
    /// `admitted_ms` (Unix ms) must go by.
    fn bound(&self, admitted_ms: i64) -> Instant {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let age =
            Duration::from_millis(u64::try_from(now_ms.saturating_sub(admitted_ms)).unwrap_or(0));
        Instant::now() + self.max_delay.saturating_sub(age)
    }

    /// Books a batch: when it may go (`None`: no pace), its turn but no
    /// later than `bound`, moving the next turn past its share.
    fn book(&self, orders: usize, bound: Option<Instant>) -> Option<Instant> {
        let per_order = self.per_order?;
        let share = per_order.saturating_mul(u32::try_from(orders).unwrap_or(u32::MAX));
        // A poisoned lock only means another consumer panicked mid-booking:
        // the instant inside is still a valid schedule.
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let turn = next.map_or(now, |n| n.max(now));
        let at = bound.map_or(turn, |b| turn.min(b.max(now)));
        *next = Some(at + share);
        Some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn unix_ms_ago(ago: Duration) -> i64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        i64::try_from((now - ago).as_millis()).unwrap()
    }

    #[tokio::test]
    async fn no_batch_waits_past_its_oldest_order_s_bound() {
        // 100 orders a second, bound 1 s: a full schedule would hold the
        // third batch of 100 for 2 s.
        let pace = DrainPace::new(100, SECOND);
        let first = pace
            .book(100, Some(pace.bound(unix_ms_ago(Duration::ZERO))))
            .unwrap();
        let second = pace
            .book(100, Some(pace.bound(unix_ms_ago(Duration::ZERO))))
            .unwrap();
        assert_eq!(second - first, SECOND, "a young batch keeps its turn");
        // Admitted 700 ms ago: due in 300 ms, long before its turn (2 s).
        let third = pace
            .book(
                100,
                Some(pace.bound(unix_ms_ago(Duration::from_millis(700)))),
            )
            .unwrap();
        let due = third - first;
        assert!(
            due >= Duration::from_millis(250) && due <= Duration::from_millis(350),
            "{due:?}"
        );
        // The schedule goes on from where that batch went, not from 2 s.
        let fourth = pace.book(1, None).unwrap();
        assert_eq!(fourth - third, SECOND);
        // Older than the bound: at once.
        let (_tx, mut stop) = watch::channel(false);
        let start = Instant::now();
        assert!(
            pace.turn(100, Some(unix_ms_ago(Duration::from_secs(5))), &mut stop)
                .await
        );
        assert!(start.elapsed() < Duration::from_millis(100));
    }

    #[tokio::test]
    async fn no_pace_never_waits() {
        let pace = DrainPace::new(0, SECOND);
        assert_eq!(pace.book(1_000, None), None);
        let (_tx, mut stop) = watch::channel(false);
        assert!(pace.turn(1_000_000, Some(0), &mut stop).await);
    }

    #[tokio::test]
    async fn each_batch_moves_the_next_turn_by_its_share() {
        let pace = DrainPace::new(500, SECOND);
        let first = pace.book(100, None).unwrap();
        assert!(first <= Instant::now(), "the first batch goes at once");
        // 100 orders at 500 a second: each next turn 200 ms after the last.
        let turns: Vec<_> = (0..4).map(|_| pace.book(100, None).unwrap()).collect();
        for (k, at) in turns.iter().enumerate() {
            let after = u32::try_from(k + 1).unwrap() * Duration::from_millis(200);
            assert_eq!(*at - first, after);
        }
        // A smaller batch costs a smaller share.
        let last = pace.book(1, None).unwrap();
        assert_eq!(pace.book(1, None).unwrap() - last, Duration::from_millis(2));
    }

    #[tokio::test]
    async fn consumers_share_one_schedule() {
        let pace = std::sync::Arc::new(DrainPace::new(1_000, SECOND));
        let start = Instant::now();
        let consumers: Vec<_> = (0..4)
            .map(|_| {
                let pace = pace.clone();
                tokio::spawn(async move {
                    let (_tx, mut stop) = watch::channel(false);
                    for _ in 0..5 {
                        assert!(pace.turn(20, None, &mut stop).await);
                    }
                })
            })
            .collect();
        for c in consumers {
            c.await.unwrap();
        }
        // 20 batches of 20 at 1,000 a second: the last goes at 380 ms at
        // the earliest, whichever consumer holds it.
        assert!(
            start.elapsed() >= Duration::from_millis(380),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn a_stop_ends_the_wait() {
        let pace = DrainPace::new(10, Duration::from_secs(60));
        let (tx, mut stop) = watch::channel(false);
        assert!(pace.turn(100, None, &mut stop).await);
        // The next turn is 10 s away; a stop ends the wait without it.
        let start = Instant::now();
        let waiting = tokio::spawn(async move { pace.turn(1, None, &mut stop).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(true).unwrap();
        assert!(!waiting.await.unwrap(), "stopped, not served");
        assert!(start.elapsed() < Duration::from_secs(9));
    }
}
