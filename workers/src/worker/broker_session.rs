//! How a worker's consumers (orders, closes) hold on to RabbitMQ: one
//! connection per session, the shared topology declared on it, a manual-ack
//! consumer with a prefetch window, and a reconnect with growing backoff
//! whenever the link breaks.
//!
//! ```text
//! reconnecting(session) ──▶ session(stop) ─ open_consumer(channel, queue, prefetch)
//!        ▲                        │            = declare topology + basic.qos + basic.consume
//!        └── backoff(failures) ◀──┘ Err (broker gone)      Ok (stop requested) ──▶ return
//! ```
//!
//! Both consumers declare the whole topology, not just their own queue, so
//! whichever process starts first makes the broker ready for every other.
//! A session that stayed up for a while resets the failure count, so the
//! backoff measures the current outage, not every one the process has seen.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use seckill_contracts::amqp_topology;
use tokio::sync::watch;
use tokio::time::Instant;

use super::backoff::Backoff;
use super::context::WorkerContext;

/// Runs `session` until it returns `Ok` (a requested stop) or `stop` turns
/// true; after an `Err` (the broker link broke) waits `backoff` for the
/// consecutive failure it was and opens a new session. A session that was
/// up for [`HEALTHY_SESSION`] before it failed starts the count afresh, so
/// a long-lived process does not wait the maximum after every hiccup just
/// because the broker failed a few times long ago.
pub(crate) async fn reconnecting<F, Fut>(
    what: &'static str,
    stop: watch::Receiver<bool>,
    backoff: Backoff,
    session: F,
) where
    F: FnMut(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    reconnecting_after(what, stop, |n| backoff.delay(n), HEALTHY_SESSION, session).await
}

/// A session up this long counts as healthy: it reached the broker,
/// declared, consumed, and the failures before it are history.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// [`reconnecting`] with the healthy span and the backoff given, so tests
/// can watch the failure counts with short sessions.
async fn reconnecting_after<F, Fut>(
    what: &'static str,
    mut stop: watch::Receiver<bool>,
    backoff: impl Fn(u32) -> Duration,
    healthy_after: Duration,
    mut session: F,
) where
    F: FnMut(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut failures = 0u32;
    loop {
        if *stop.borrow() {
            return;
        }
        let started = Instant::now();
        let Err(e) = session(stop.clone()).await else {
            return;
        };
        if started.elapsed() >= healthy_after {
            failures = 0;
        }
        let wait = backoff(failures);
        failures = failures.saturating_add(1);
        tracing::warn!(error = %e, retry_in = ?wait, "{what} session ended");
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Declares the shared topology on `channel`, limits unacked deliveries to
/// `prefetch` and starts a manual-ack consumer on `queue`.
pub(crate) async fn open_consumer(
    ctx: &WorkerContext,
    channel: &Channel,
    queue: &str,
    prefetch: u16,
) -> lapin::Result<Consumer> {
    let amqp = &ctx.config.amqp;
    amqp_topology::declare(
        channel,
        amqp,
        amqp_topology::close_delay_ms(&ctx.config.worker),
    )
    .await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Counts a live order consumer for as long as it is held (the worker's
/// fleet report says "broker: down" when none is).
pub(crate) struct LiveConsumer(());

impl LiveConsumer {
    pub(crate) fn start() -> LiveConsumer {
        super::metrics::METRICS.consumers_live.inc();
        LiveConsumer(())
    }
}

impl Drop for LiveConsumer {
    fn drop(&mut self) {
        super::metrics::METRICS.consumers_live.dec();
    }
}

/// The consumer's next delivery, or `Ok(None)` once `stop` turns true (a
/// stop wins over a delivery that arrived at the same moment, which then
/// stays unacked and is redelivered). A failed stream or a consumer the
/// broker cancelled is an `Err`: the session ends and reconnects.
pub(crate) async fn next_delivery(
    consumer: &mut Consumer,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<Option<Delivery>> {
    let next = tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => return Ok(None),
        d = consumer.next() => d,
    };
    match next {
        Some(d) => Ok(Some(d?)),
        None => Err(anyhow::anyhow!("the broker cancelled the consumer")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn a_healthy_session_resets_the_backoff() {
        let (_stop_tx, stop) = watch::channel(false);
        // The failure counts `reconnecting` asked the backoff for, in order.
        let steps = Arc::new(Mutex::new(Vec::new()));
        let recording = {
            let steps = steps.clone();
            move |step: u32| {
                steps.lock().unwrap_or_else(|e| e.into_inner()).push(step);
                Duration::from_millis(1)
            }
        };
        let mut calls = 0u32;
        let healthy_after = Duration::from_millis(50);
        reconnecting_after("test", stop, recording, healthy_after, |_| {
            calls += 1;
            let call = calls;
            async move {
                match call {
                    1..=3 => Err(anyhow::anyhow!("broker unreachable")),
                    // Up for longer than `healthy_after`, then the link broke.
                    4 => {
                        tokio::time::sleep(healthy_after * 2).await;
                        Err(anyhow::anyhow!("connection reset"))
                    }
                    5 => Err(anyhow::anyhow!("broker unreachable")),
                    _ => Ok(()),
                }
            }
        })
        .await;
        let steps = steps.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(
            steps,
            vec![0, 1, 2, 0, 1],
            "the failures before a healthy session no longer count"
        );
    }

    #[tokio::test]
    async fn a_stop_ends_the_loop_during_the_wait() {
        let (stop_tx, stop) = watch::channel(false);
        let mut calls = 0u32;
        let long_wait = |_: u32| Duration::from_secs(3600);
        let run = reconnecting_after("test", stop, long_wait, HEALTHY_SESSION, |_| {
            calls += 1;
            async { Err(anyhow::anyhow!("broker unreachable")) }
        });
        let stopper = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = stop_tx.send(true);
        };
        let finished =
            tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(run, stopper) })
                .await;
        assert!(finished.is_ok(), "a stop must not wait out the backoff");
        assert_eq!(calls, 1);
    }
}
