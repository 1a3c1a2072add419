//! TCC: the api coordinates a payment as Try on both branches, then
//! Confirm or Cancel on both, with its decision in the log first.
//!
//! ```text
//!  [log started + Try order (unpaid→paying)] ─▶ Try wallet (freeze)
//!     │ both held                                 │ either refused / silent
//!     ▼                                           ▼
//!  [log committing + Confirm order (paid)] ─▶ Confirm wallet (debit) ─▶ log committed
//!                    log aborting ─▶ Cancel wallet ─▶ Cancel order ─▶ log aborted
//! ```
//!
//! The order branch goes first so a second payment of the same order is
//! refused before it freezes any money. The log lives in the order's
//! database, so the steps in brackets are each one local transaction: a
//! payment costs the database five commits, not seven (and under a burst
//! each is shared with other payments' same step, [`crate::group_commit`]),
//! and a refused order is logged `aborted` without anything to cancel. A crash anywhere leaves the log
//! saying what is left to do; [`super::recovery`] does it (a `started`
//! transaction it aborts; the fences make a late Try refused and every
//! repeated Confirm or Cancel harmless). Named fail points (the `fail`
//! crate, compiled in only with the `failpoints` feature) sit after every
//! step, where the tests cut the call short as a dying process would.

use super::fence::EndOutcome;
use super::log::PayTx;
use super::order_branch::HoldOutcome;
use super::wallet_client::WalletCallError;
use super::{wallet_failure, PayError, Payments, Step};
use crate::statuses::{AbortReason, TxState};
use crate::wallet::tcc::TryOutcome;

/// Pays `tx`: logs it together with the order's Try.
pub async fn pay(p: &Payments, tx: &PayTx) -> Result<Step, PayError> {
    let held = p.order_steps().log_and_hold(tx).await?;
    if held == HoldOutcome::Refused {
        // Logged `aborted`; nothing was held, the wallet never asked.
        return Ok(Step::Aborted(AbortReason::OrderNotPayable));
    }
    fail::fail_point!("tcc.after_try_order", |_| Err(PayError::Injected(
        "tcc.after_try_order"
    )));
    let tried = p.wallet_batches().tcc_try(tx.wallet_request()).await;
    fail::fail_point!("tcc.after_try_wallet", |_| Err(PayError::Injected(
        "tcc.after_try_wallet"
    )));
    let refused = match tried {
        Ok(TryOutcome::Frozen | TryOutcome::Repeat) => None,
        Ok(TryOutcome::InsufficientFunds) => Some(AbortReason::InsufficientFunds),
        // Recovery cancelled this transaction while its Try was on the way.
        Ok(TryOutcome::Suspended) => Some(AbortReason::Timeout),
        Err(e) => Some(wallet_failure(tx, "Try", e)),
    };
    if let Some(reason) = refused {
        return abort(p, tx, reason).await;
    }
    match p.order_steps().decide_and_confirm(&tx.tx_id).await? {
        Some(EndOutcome::Done | EndOutcome::Repeat) => {}
        Some(other) => return Err(inconsistent(tx, "order Confirm", other)),
        None => {
            // Recovery decided first (the transaction outlived its timeout).
            return finish_abort(p, tx)
                .await
                .map(|_| Step::Aborted(AbortReason::Timeout));
        }
    }
    fail::fail_point!("tcc.after_decide", |_| Err(PayError::Injected(
        "tcc.after_decide"
    )));
    Ok(if confirm_wallet(p, tx).await? {
        Step::Committed
    } else {
        Step::Decided
    })
}

/// Confirms both branches of a transaction decided `committing` (what
/// recovery does; the coordinator has confirmed the order with its
/// decision); true once the log says `committed`, false when the wallet
/// did not answer (the next pass confirms it).
pub async fn commit(p: &Payments, tx: &PayTx) -> Result<bool, PayError> {
    match p.order_steps().confirm(&tx.tx_id).await? {
        EndOutcome::Done | EndOutcome::Repeat => {}
        other => return Err(inconsistent(tx, "order Confirm", other)),
    }
    confirm_wallet(p, tx).await
}

/// The wallet's Confirm, then the log `committed`.
async fn confirm_wallet(p: &Payments, tx: &PayTx) -> Result<bool, PayError> {
    match p.wallet_batches().tcc_confirm(&tx.tx_id).await {
        Ok(EndOutcome::Done | EndOutcome::Repeat) => {}
        Ok(other) => return Err(inconsistent(tx, "wallet Confirm", other)),
        Err(WalletCallError::Unavailable(why)) => {
            tracing::warn!(tx_id = %tx.tx_id, %why, "wallet Confirm unanswered; recovery finishes it");
            return Ok(false);
        }
        Err(e) => return Err(PayError::Wallet(e)),
    }
    fail::fail_point!("tcc.after_confirm_wallet", |_| {
        Err(PayError::Injected("tcc.after_confirm_wallet"))
    });
    p.end_log(tx, TxState::Committing, TxState::Committed)
        .await?;
    Ok(true)
}

/// Decides `aborting` (unless already decided so) and cancels both
/// branches.
pub async fn abort(p: &Payments, tx: &PayTx, reason: AbortReason) -> Result<Step, PayError> {
    p.decide_abort(tx, reason).await?;
    fail::fail_point!("tcc.after_decide_abort", |_| {
        Err(PayError::Injected("tcc.after_decide_abort"))
    });
    finish_abort(p, tx).await?;
    Ok(Step::Aborted(reason))
}

/// Cancels both branches of a transaction decided `aborting`; true once
/// the log says `aborted`. The order is given back even when the wallet
/// does not answer: the decision is logged, and recovery cancels the
/// wallet's branch (whose Try, if it ever lands, its fence refuses).
pub async fn finish_abort(p: &Payments, tx: &PayTx) -> Result<bool, PayError> {
    let wallet_done = match p.wallet_batches().tcc_cancel(&tx.tx_id).await {
        Ok(EndOutcome::Done | EndOutcome::Repeat | EndOutcome::EmptyRollback) => true,
        Ok(EndOutcome::Refused) => {
            return Err(inconsistent(tx, "wallet Cancel", EndOutcome::Refused))
        }
        Err(WalletCallError::Unavailable(why)) => {
            tracing::warn!(tx_id = %tx.tx_id, %why, "wallet Cancel unanswered; recovery finishes it");
            false
        }
        Err(e) => return Err(PayError::Wallet(e)),
    };
    fail::fail_point!("tcc.after_cancel_wallet", |_| {
        Err(PayError::Injected("tcc.after_cancel_wallet"))
    });
    if p.order_steps().cancel(&tx.tx_id).await? == EndOutcome::Refused {
        return Err(inconsistent(tx, "order Cancel", EndOutcome::Refused));
    }
    fail::fail_point!("tcc.after_cancel_order", |_| {
        Err(PayError::Injected("tcc.after_cancel_order"))
    });
    if !wallet_done {
        return Ok(false);
    }
    p.end_log(tx, TxState::Aborting, TxState::Aborted).await?;
    Ok(true)
}

fn inconsistent(tx: &PayTx, step: &str, outcome: EndOutcome) -> PayError {
    PayError::Inconsistent(format!("{}: {step} answered {outcome:?}", tx.tx_id))
}

/// Every fail point of this mode, in the order a payment passes them.
pub const FAIL_POINTS: &[&str] = &[
    "tcc.after_try_order",
    "tcc.after_try_wallet",
    "tcc.after_decide",
    "tcc.after_confirm_wallet",
    "tcc.after_decide_abort",
    "tcc.after_cancel_wallet",
    "tcc.after_cancel_order",
];
