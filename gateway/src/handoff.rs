//! Handing an admitted purchase to RabbitMQ, or giving its reservation back:
//! the step after `admit.lua` took a unit of stock (SPEC invariant 3).
//!
//! ```text
//! seckill.enqueue(order) ─▶ spawned task:
//!     publish with confirm, within (time the rule call has left − rollback reserve)
//!       ├─ confirmed ─────────────────────────────▶ Queued
//!       └─ failed ─▶ release.lua, within the reserve
//!                     ├─  1 unit back in stock ───▶ Released
//!                     ├─ -1 a worker claimed it ──▶ Claimed (the message did arrive)
//!                     ├─  0 no longer this request's ▶ NotHeld
//!                     └─ error / timeout ─────────▶ ReleaseFailed
//! ```
//!
//! Why a spawned task: a rule call is cut when its wall-clock limit passes,
//! and a cut call's coroutine is simply dropped. If the publish and the
//! rollback ran in the call itself, a cut between them would strand the
//! reservation (the buyer would get a 500, and a retry a 409 until the
//! sweeper gave the unit back). The task does not belong to the call: it
//! always runs to the end, answered or not.
//!
//! Why the deadlines: the publish gets only what the call has left minus
//! [`GatewayConfig::rollback_reserve_ms`](seckill_contracts::config::GatewayConfig),
//! so in every case the rollback, too, finishes while the rule can still
//! answer the buyer with the truth (a 503 saying what happened) instead of
//! the call being cut. The config check makes sure the broker's confirm
//! timeout fits in that window.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use seckill_contracts::message::OrderMessage;
use seckill_contracts::reservation::RELEASED_TTL_SECS;
use seckill_contracts::scripts::{release_reply, RELEASE};

use crate::services::HostServices;

/// The release script, built once (its SHA is computed once).
static RELEASE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RELEASE));

/// What became of an admitted purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handoff {
    /// The broker confirmed the message.
    Queued,
    /// The publish failed, but a worker had already claimed the
    /// reservation: the message did reach the queue.
    Claimed,
    /// The publish failed; the unit is back in stock and the buyer may
    /// retry at once.
    Released,
    /// The publish failed and the reservation was no longer this
    /// request's (a worker settled it, or the sweeper released it): the
    /// result endpoint has the outcome.
    NotHeld,
    /// The publish failed and so did giving the unit back; the sweeper
    /// releases the reservation after its timeout.
    ReleaseFailed,
}

impl Handoff {
    /// The name rules see (`seckill.enqueue`'s first result).
    pub fn as_str(&self) -> &'static str {
        match self {
            Handoff::Queued => "queued",
            Handoff::Claimed => "claimed",
            Handoff::Released => "released",
            Handoff::NotHeld => "not_held",
            Handoff::ReleaseFailed => "release_failed",
        }
    }
}

/// The outcome plus what went wrong on the way, for the rule's log line.
#[derive(Debug, Clone)]
pub struct HandoffReport {
    pub outcome: Handoff,
    /// Why the publish failed (and the release, if it did too).
    pub error: Option<String>,
}

/// Publishes `msg` or gives its reservation back, in a task of its own.
/// `time_left` is what the calling rule has before it is cut. The returned
/// report arrives within `time_left` unless Redis or the runtime stall; the
/// task finishes its work either way.
pub async fn hand_off(
    services: Arc<HostServices>,
    msg: OrderMessage,
    time_left: Duration,
) -> HandoffReport {
    let reserve = services.rollback_reserve();
    let publish_window = time_left.saturating_sub(reserve);
    let task =
        tokio::spawn(async move { publish_or_release(&services, &msg, publish_window).await });
    task.await.unwrap_or_else(|join| HandoffReport {
        outcome: Handoff::ReleaseFailed,
        error: Some(format!("hand-off task failed: {join}")),
    })
}

async fn publish_or_release(
    services: &HostServices,
    msg: &OrderMessage,
    publish_window: Duration,
) -> HandoffReport {
    let published = match tokio::time::timeout(publish_window, services.publish(msg)).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no publisher confirm within the {} ms the rule call had left",
            publish_window.as_millis()
        )),
    };
    let Err(publish_error) = published else {
        return HandoffReport {
            outcome: Handoff::Queued,
            error: None,
        };
    };
    let (outcome, release_error) = match release(services, msg).await {
        Ok(release_reply::RELEASED) => (Handoff::Released, None),
        Ok(release_reply::CLAIMED) => (Handoff::Claimed, None),
        Ok(_) => (Handoff::NotHeld, None),
        Err(e) => (Handoff::ReleaseFailed, Some(e)),
    };
    let error = match release_error {
        None => publish_error,
        Some(e) => format!("{publish_error}; giving the unit back failed: {e}"),
    };
    HandoffReport {
        outcome,
        error: Some(error),
    }
}

/// Runs `release.lua` for `msg`'s reservation within the rollback reserve.
async fn release(services: &HostServices, msg: &OrderMessage) -> Result<i64, String> {
    let reserve = services.rollback_reserve();
    let run = async {
        let mut conn = services.redis_within(reserve).await?;
        let keys = services.keys.sale(msg.sale_id);
        RELEASE_SCRIPT
            .key(keys.reservations())
            .key(keys.stock())
            .key(keys.buyers())
            .key(keys.released())
            .arg(msg.user_id)
            .arg(msg.message_id.as_str())
            .arg(RELEASED_TTL_SECS)
            .arg(0)
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| format!("redis: {e}"))
    };
    tokio::time::timeout(reserve, run)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} ms", reserve.as_millis())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rollback runs the shipped `lua/shared/release.lua`, the same text
    /// the workers' sweeper runs (its own test checks against the file).
    #[test]
    fn the_rollback_runs_the_shared_release_script() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../lua/shared/release.lua");
        let shipped = std::fs::read_to_string(file).unwrap();
        assert_eq!(
            RELEASE_SCRIPT.get_hash(),
            redis::Script::new(&shipped).get_hash()
        );
    }

    #[test]
    fn outcome_names_are_what_rules_match_on() {
        let names: Vec<_> = [
            Handoff::Queued,
            Handoff::Claimed,
            Handoff::Released,
            Handoff::NotHeld,
            Handoff::ReleaseFailed,
        ]
        .iter()
        .map(Handoff::as_str)
        .collect();
        assert_eq!(
            names,
            [
                "queued",
                "claimed",
                "released",
                "not_held",
                "release_failed"
            ]
        );
    }
}
