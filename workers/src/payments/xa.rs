//! XA: the api coordinates a payment as a two-phase commit over MariaDB
//! XA branches, one in each database, with its decision in the log
//! before phase two.
//!
//! ```text
//!  log started ─▶ prepare order (paid, row locked) ─▶ prepare wallet (debit)
//!     │ both prepared                                   │ either refused / silent
//!     ▼                                                 ▼
//!  log committing ─▶ commit wallet ─▶ commit order ─▶ log committed
//!                    log aborting ─▶ roll back wallet ─▶ roll back order ─▶ log aborted
//! ```
//!
//! Unlike TCC, nothing is visible before phase two: the order is not
//! `paying`, it is locked (a second payment or the closer waits on the
//! row), and the money is not frozen, it is debited inside a branch no
//! one else can see. A crash leaves prepared branches in `XA RECOVER`,
//! locks held; [`super::recovery`] ends them as the log says: a
//! `started` transaction is aborted, a decided one finished, and a
//! prepared branch of a transaction the log has already ended (a prepare
//! that landed after its abort) is ended the same way.
//!
//! The order branch's connection stays with the payment that prepared it,
//! so phase two on it is one statement; a wallet instance likewise holds
//! its branch ([`crate::wallet::xa`]). Fail points (the `fail` crate, only
//! with the `failpoints` feature) after every step cut the call short as a
//! dying process would; the branch connection it held then closes, and
//! the branch waits for recovery.

use super::fence::EndOutcome;
use super::log::{self, PayTx};
use super::order_branch::{self, BRANCH as ORDER};
use super::wallet_client::WalletCallError;
use super::xa_branch::{self, BranchConn, Detached, Xid};
use super::{wallet_failure, PayError, Payments, Step};
use crate::statuses::{AbortReason, OrderStatus, TxState};
use crate::wallet::xa::PrepareOutcome;

/// Pays `tx`: logs it `started` (through the log's own connections:
/// an XA branch cannot share its session), then prepares both branches.
pub async fn pay(p: &Payments, tx: &PayTx) -> Result<Step, PayError> {
    p.begin_log(tx).await?;
    fail::fail_point!("xa.after_begin", |_| Err(PayError::Injected(
        "xa.after_begin"
    )));
    let prepared = order_branch::xa_prepare(p.db(), &tx.tx_id, tx.user_id, &tx.order_id).await?;
    let Some(order) = prepared else {
        return abort(p, tx, AbortReason::OrderNotPayable, None).await;
    };
    fail::fail_point!("xa.after_prepare_order", |_| Err(PayError::Injected(
        "xa.after_prepare_order"
    )));
    let wallet = p.wallet().xa_prepare(&tx.wallet_request()).await;
    fail::fail_point!("xa.after_prepare_wallet", |_| Err(PayError::Injected(
        "xa.after_prepare_wallet"
    )));
    let refused = match wallet {
        Ok(PrepareOutcome::Prepared | PrepareOutcome::Repeat) => None,
        Ok(PrepareOutcome::InsufficientFunds) => Some(AbortReason::InsufficientFunds),
        Err(e) => Some(wallet_failure(tx, "prepare", e)),
    };
    if let Some(reason) = refused {
        return abort(p, tx, reason, Some(order)).await;
    }
    if !p
        .advance_log(tx, TxState::Started, TxState::Committing, None)
        .await?
    {
        // Recovery decided first (the transaction outlived its timeout).
        return finish_abort(p, tx, Some(order))
            .await
            .map(|_| Step::Aborted(AbortReason::Timeout));
    }
    fail::fail_point!("xa.after_decide", |_| Err(PayError::Injected(
        "xa.after_decide"
    )));
    Ok(if commit(p, tx, Some(order)).await? {
        Step::Committed
    } else {
        Step::Decided
    })
}

/// Phase two, commit, of a transaction decided `committing`; `order` is
/// the order branch's connection when this process still holds it. True
/// once the log says `committed`, false when a branch could not be
/// reached yet (recovery commits it later).
pub async fn commit(p: &Payments, tx: &PayTx, order: Option<BranchConn>) -> Result<bool, PayError> {
    let wallet_done = match p.wallet().xa_commit(&tx.tx_id).await {
        Ok(EndOutcome::Done | EndOutcome::Repeat) => true,
        Ok(other) => return Err(inconsistent(tx, "wallet commit", other)),
        Err(WalletCallError::Unavailable(why)) => {
            tracing::warn!(tx_id = %tx.tx_id, %why, "wallet commit unanswered; recovery finishes it");
            false
        }
        Err(e) => return Err(PayError::Wallet(e)),
    };
    fail::fail_point!("xa.after_commit_wallet", |_| Err(PayError::Injected(
        "xa.after_commit_wallet"
    )));
    let order_done = match order {
        Some(branch) => {
            branch.commit().await?;
            true
        }
        None => end_order_detached(p, tx, true).await?,
    };
    fail::fail_point!("xa.after_commit_order", |_| Err(PayError::Injected(
        "xa.after_commit_order"
    )));
    if !(wallet_done && order_done) {
        return Ok(false);
    }
    p.end_log(tx, TxState::Committing, TxState::Committed)
        .await?;
    Ok(true)
}

/// Decides `aborting` (unless already decided so) and rolls both
/// branches back.
pub async fn abort(
    p: &Payments,
    tx: &PayTx,
    reason: AbortReason,
    order: Option<BranchConn>,
) -> Result<Step, PayError> {
    p.decide_abort(tx, reason).await?;
    fail::fail_point!("xa.after_decide_abort", |_| Err(PayError::Injected(
        "xa.after_decide_abort"
    )));
    finish_abort(p, tx, order).await?;
    Ok(Step::Aborted(reason))
}

/// Phase two, rollback, of a transaction decided `aborting`; true once
/// the log says `aborted`.
pub async fn finish_abort(
    p: &Payments,
    tx: &PayTx,
    order: Option<BranchConn>,
) -> Result<bool, PayError> {
    let wallet_done = match p.wallet().xa_rollback(&tx.tx_id).await {
        Ok(EndOutcome::Done | EndOutcome::EmptyRollback | EndOutcome::Repeat) => true,
        Ok(EndOutcome::Refused) => {
            return Err(inconsistent(tx, "wallet rollback", EndOutcome::Refused))
        }
        Err(WalletCallError::Unavailable(why)) => {
            tracing::warn!(tx_id = %tx.tx_id, %why, "wallet rollback unanswered; recovery finishes it");
            false
        }
        Err(e) => return Err(PayError::Wallet(e)),
    };
    fail::fail_point!("xa.after_rollback_wallet", |_| Err(PayError::Injected(
        "xa.after_rollback_wallet"
    )));
    let order_done = match order {
        Some(branch) => {
            branch.rollback().await?;
            true
        }
        None => end_order_detached(p, tx, false).await?,
    };
    fail::fail_point!("xa.after_rollback_order", |_| Err(PayError::Injected(
        "xa.after_rollback_order"
    )));
    if !(wallet_done && order_done) {
        return Ok(false);
    }
    p.end_log(tx, TxState::Aborting, TxState::Aborted).await?;
    Ok(true)
}

/// Ends the order branch from this session (the one that prepared it is
/// gone); false while another live session still holds it.
async fn end_order_detached(p: &Payments, tx: &PayTx, commit: bool) -> Result<bool, PayError> {
    let xid = Xid::new(&tx.tx_id, ORDER)?;
    match xa_branch::end_detached(p.db(), &xid, commit).await? {
        Detached::Done => Ok(true),
        Detached::Busy => Ok(false),
        // Ended before, or (rolling back) never prepared. A commit must
        // find the order paid, or the branch was lost.
        Detached::Absent if commit => {
            let status: Option<String> =
                sqlx::query_scalar("SELECT CAST(status AS CHAR) FROM orders WHERE id = ?")
                    .bind(&tx.order_id)
                    .fetch_optional(p.db())
                    .await
                    .map_err(crate::orders::OrderError::from)?;
            if status.as_deref() != Some(OrderStatus::Paid.as_str()) {
                return Err(PayError::Inconsistent(format!(
                    "{}: committing an order branch that is gone, order {status:?}",
                    tx.tx_id
                )));
            }
            Ok(true)
        }
        Detached::Absent => Ok(true),
    }
}

/// Ends prepared branches of transactions the log has already ended
/// (a prepare that landed after its transaction was aborted, or a branch
/// whose phase two was lost): how many it ended. Branches of unknown or
/// still-open transactions are left alone (the stale-transaction pass
/// owns those; unknown ones belong to someone else on this server).
pub async fn end_orphans(p: &Payments) -> Result<u32, PayError> {
    let mut conn = p
        .db()
        .acquire()
        .await
        .map_err(crate::orders::OrderError::from)?;
    let order_ids = xa_branch::prepared(&mut conn, ORDER).await?;
    drop(conn);
    let wallet_ids = p.wallet().xa_prepared().await?;
    let mut ended = 0;
    for (ids, is_order) in [(order_ids, true), (wallet_ids, false)] {
        for tx_id in ids {
            let Some(tx) = log::get(p.log_db(), &tx_id).await? else {
                continue;
            };
            let commit = match tx.state {
                TxState::Committed => true,
                TxState::Aborted => false,
                _ => continue,
            };
            let done = if is_order {
                end_order_detached(p, &tx, commit).await?
            } else if commit {
                p.wallet().xa_commit(&tx_id).await.is_ok()
            } else {
                p.wallet().xa_rollback(&tx_id).await.is_ok()
            };
            if done {
                tracing::warn!(%tx_id, commit, order = is_order, "ended an orphaned XA branch");
                ended += 1;
            }
        }
    }
    Ok(ended)
}

fn inconsistent(tx: &PayTx, step: &str, outcome: EndOutcome) -> PayError {
    PayError::Inconsistent(format!("{}: {step} answered {outcome:?}", tx.tx_id))
}

/// Every fail point of this mode, in the order a payment passes them.
pub const FAIL_POINTS: &[&str] = &[
    "xa.after_begin",
    "xa.after_prepare_order",
    "xa.after_prepare_wallet",
    "xa.after_decide",
    "xa.after_commit_wallet",
    "xa.after_commit_order",
    "xa.after_decide_abort",
    "xa.after_rollback_wallet",
    "xa.after_rollback_order",
];
