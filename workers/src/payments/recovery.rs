//! Ends every payment transaction that was left open: the api died in the
//! middle, a participant did not answer, or the call simply took longer
//! than `payment.transaction_timeout_ms`. What the log says decides:
//!
//! ```text
//!   started     → abort (timeout): Cancel every branch (a Try still on its
//!                 way is refused by its fence)
//!   committing  → Confirm every branch
//!   aborting    → Cancel every branch
//! ```
//!
//! (in the transaction's own mode: an `xa` one is ended with its whole
//! group, Confirm and Cancel being XA commit and rollback, see
//! [`xa::recover_group`]; a `message` one is checked back with the
//! wallet, see [`message::recover`]). Each pass also ends XA branches left
//! prepared for a transaction the log has already ended
//! ([`xa::end_orphans`], in an `xa` deployment); in a `message` one it
//! deletes consumed-message records past `payment.message_retention_secs`.
//!
//! Every api runs the loop; the Redis lock `payments-recovery` lets one
//! of them work at a time. Correctness never depends on the lock: every
//! step is guarded by the log and the fences.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::log::{self, PayTx};
use super::{message, tcc, xa, PayError, Payments};
use crate::lock::RedisLock;
use crate::statuses::{AbortReason, TxState};
use seckill_contracts::config::PaymentMode;

/// The Redis lock one api at a time recovers under.
pub const LOCK_NAME: &str = "payments-recovery";

/// Transactions one pass looks at.
const BATCH: u32 = 200;

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    pub committed: u32,
    pub aborted: u32,
    /// Still open (a participant did not answer): the next pass retries.
    pub left_open: u32,
    /// XA branches ended after their transaction (see [`xa::end_orphans`]).
    pub orphans_ended: u32,
}

/// One pass over transactions idle for more than `older_than`.
pub async fn recover_once(p: &Payments, older_than: Duration) -> Result<RecoveryReport, PayError> {
    let ms = u64::try_from(older_than.as_millis()).unwrap_or(u64::MAX);
    let mut report = RecoveryReport::default();
    // Several at once, so their steps share groups as live payments' do:
    // after an api dies, its hundreds of payments end in a few groups
    // rather than one round trip after another.
    let at_once = p.config().group_commit_max.max(1) as usize;
    let mut stale = log::stale(p.log_db(), ms, BATCH).await?;
    // An XA group is driven once, whichever of its payments came up.
    let mut groups = std::collections::HashSet::new();
    stale.retain(|tx| xa_group(tx).is_none_or(|g| groups.insert(g.to_string())));
    let mut driven = futures::stream::iter(stale)
        .map(|tx| async move { (drive(p, &tx).await, tx) })
        .buffer_unordered(at_once);
    while let Some((outcome, tx)) = driven.next().await {
        match outcome {
            Ok(Some(TxState::Committed)) => report.committed += 1,
            Ok(Some(_)) => report.aborted += 1,
            Ok(None) => report.left_open += 1,
            Err(e) => {
                tracing::error!(tx_id = %tx.tx_id, error = %e, "payment recovery step failed");
                report.left_open += 1;
            }
        }
    }
    match p.config().mode {
        PaymentMode::Xa => match xa::end_orphans(p).await {
            Ok(n) => report.orphans_ended = n,
            Err(e) => tracing::warn!(error = %e, "looking for orphaned XA branches failed"),
        },
        PaymentMode::Message => {
            let retention = p.config().message_retention_secs;
            if let Err(e) = message::prune_consumed(p, retention).await {
                tracing::warn!(error = %e, "pruning consumed payment messages failed");
            }
        }
        PaymentMode::Tcc => {}
    }
    if report != RecoveryReport::default() {
        tracing::info!(?report, "payment recovery pass");
    }
    Ok(report)
}

/// Drives one transaction; the final state it reached, or `None` when a
/// participant did not answer.
async fn drive(p: &Payments, tx: &PayTx) -> Result<Option<TxState>, PayError> {
    if let Some(group) = xa_group(tx) {
        return xa::recover_group(p, group).await;
    }
    let finished = match (tx.state, tx.mode) {
        (TxState::Committed | TxState::Aborted, _) => true,
        (_, PaymentMode::Message) => message::recover(p, tx).await?,
        (TxState::Started, _) => {
            tcc::abort(p, tx, AbortReason::Timeout).await?;
            // abort() finished the branches unless one could not be reached.
            log::get(p.log_db(), &tx.tx_id).await?.map(|t| t.state) == Some(TxState::Aborted)
        }
        (TxState::Committing, _) => tcc::commit(p, tx).await?,
        (TxState::Aborting, _) => tcc::finish_abort(p, tx).await?,
    };
    if !finished {
        return Ok(None);
    }
    Ok(log::get(p.log_db(), &tx.tx_id).await?.map(|t| t.state))
}

/// The XA group an `xa` transaction ran in (before groups, each was a
/// group of one named by its own id).
fn xa_group(tx: &PayTx) -> Option<&str> {
    (tx.mode == PaymentMode::Xa).then(|| tx.xa_group.as_deref().unwrap_or(&tx.tx_id))
}

/// Runs [`recover_once`] every `payment.recovery_interval_ms` while this
/// process holds the recovery lock, until the process ends.
pub fn spawn(payments: Arc<Payments>, lock: RedisLock) {
    tokio::spawn(async move {
        let interval = Duration::from_millis(payments.config().recovery_interval_ms);
        let older_than = Duration::from_millis(payments.config().transaction_timeout_ms);
        loop {
            match lock.try_acquire().await {
                Ok(Some(guard)) => {
                    if let Err(e) = recover_once(&payments, older_than).await {
                        tracing::warn!(error = %e, "payment recovery pass failed");
                    }
                    if let Err(e) = guard.release().await {
                        tracing::debug!(error = %e, "releasing the payment recovery lock");
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "payment recovery lock unavailable"),
            }
            tokio::time::sleep(interval).await;
        }
    });
}
