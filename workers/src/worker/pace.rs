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

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// The shared schedule of a process's consumers.
#[derive(Debug)]
pub struct DrainPace {
    /// Time each order costs of the schedule; `None`: no pace.
    per_order: Option<Duration>,
    /// When the next batch may be written.
    next: Mutex<Option<Instant>>,
}

impl DrainPace {
    /// A pace of `orders_per_sec` (0: none).
    pub fn new(orders_per_sec: u32) -> DrainPace {
        DrainPace {
            per_order: (orders_per_sec > 0).then(|| Duration::from_secs(1) / orders_per_sec),
            next: Mutex::new(None),
        }
    }

    /// Waits for the turn of a batch of `orders`; false when `stop` turned
    /// true meanwhile (the caller leaves the batch unacked: the broker
    /// hands it to the next consumer).
    pub async fn turn(&self, orders: usize, stop: &mut watch::Receiver<bool>) -> bool {
        let Some(at) = self.book(orders) else {
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

    /// Books a batch: when it may go (`None`: no pace), moving the next
    /// turn past its share.
    fn book(&self, orders: usize) -> Option<Instant> {
        let per_order = self.per_order?;
        let share = per_order.saturating_mul(u32::try_from(orders).unwrap_or(u32::MAX));
        // A poisoned lock only means another consumer panicked mid-booking:
        // the instant inside is still a valid schedule.
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let at = next.map_or(now, |n| n.max(now));
        *next = Some(at + share);
        Some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_pace_never_waits() {
        let pace = DrainPace::new(0);
        assert_eq!(pace.book(1_000), None);
        let (_tx, mut stop) = watch::channel(false);
        assert!(pace.turn(1_000_000, &mut stop).await);
    }

    #[tokio::test]
    async fn each_batch_moves_the_next_turn_by_its_share() {
        let pace = DrainPace::new(500);
        let first = pace.book(100).unwrap();
        assert!(first <= Instant::now(), "the first batch goes at once");
        // 100 orders at 500 a second: each next turn 200 ms after the last.
        let turns: Vec<_> = (0..4).map(|_| pace.book(100).unwrap()).collect();
        for (k, at) in turns.iter().enumerate() {
            let after = u32::try_from(k + 1).unwrap() * Duration::from_millis(200);
            assert_eq!(*at - first, after);
        }
        // A smaller batch costs a smaller share.
        let last = pace.book(1).unwrap();
        assert_eq!(pace.book(1).unwrap() - last, Duration::from_millis(2));
    }

    #[tokio::test]
    async fn consumers_share_one_schedule() {
        let pace = std::sync::Arc::new(DrainPace::new(1_000));
        let start = Instant::now();
        let consumers: Vec<_> = (0..4)
            .map(|_| {
                let pace = pace.clone();
                tokio::spawn(async move {
                    let (_tx, mut stop) = watch::channel(false);
                    for _ in 0..5 {
                        assert!(pace.turn(20, &mut stop).await);
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
        let pace = DrainPace::new(10);
        let (tx, mut stop) = watch::channel(false);
        assert!(pace.turn(100, &mut stop).await);
        // The next turn is 10 s away; a stop ends the wait without it.
        let start = Instant::now();
        let waiting = tokio::spawn(async move { pace.turn(1, &mut stop).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(true).unwrap();
        assert!(!waiting.await.unwrap(), "stopped, not served");
        assert!(start.elapsed() < Duration::from_secs(9));
    }
}
