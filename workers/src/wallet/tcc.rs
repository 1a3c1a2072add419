//! The wallet's branch of a TCC payment: Try freezes the order's amount,
//! Confirm spends the frozen money (the order's one debit), Cancel gives
//! it back. Each step is one local transaction of the wallet's database
//! holding the fence step ([`crate::payments::fence`]) and the movement
//! it allows, so the coordinator may repeat, reorder or lose any call.
//! Each step is a stored procedure (`migrations/wallet/*_wallet_branch_steps.sql`)
//! called once: the database runs the step's five or six statements
//! without a round trip between them.

use serde::{Deserialize, Serialize};
use sqlx::MySqlPool;

use crate::orders::retry_on_deadlock;

use super::accounts::WalletError;
use crate::payments::fence::{self, EndOutcome};
use crate::statuses::{FencePhase, UnknownValue};

/// This branch's name in the fence.
pub const BRANCH: &str = "wallet";

/// What a Try did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TryOutcome {
    /// The amount is frozen now.
    Frozen,
    /// It was frozen by an earlier Try of this transaction.
    Repeat,
    /// This transaction was cancelled first: nothing frozen, ever.
    Suspended,
    /// The balance does not cover the amount: nothing frozen.
    InsufficientFunds,
}

/// Try: freeze `amount_cents` of `user_id`'s balance for `order_id`.
pub async fn try_freeze(
    db: &MySqlPool,
    tx_id: &str,
    user_id: u64,
    order_id: &str,
    amount_cents: i64,
) -> Result<TryOutcome, WalletError> {
    retry_on_deadlock(|| try_freeze_once(db, tx_id, user_id, order_id, amount_cents)).await
}

/// The `wallet_try` procedure: fence and freeze in one local
/// transaction, one round trip.
async fn try_freeze_once(
    db: &MySqlPool,
    tx_id: &str,
    user_id: u64,
    order_id: &str,
    amount_cents: i64,
) -> Result<TryOutcome, WalletError> {
    let outcome: Option<String> = sqlx::query_scalar("CALL wallet_try(?, ?, ?, ?)")
        .bind(tx_id)
        .bind(user_id)
        .bind(order_id)
        .bind(amount_cents)
        .fetch_one(db)
        .await?;
    Ok(match outcome.as_deref() {
        Some("frozen") => TryOutcome::Frozen,
        Some("repeat") => TryOutcome::Repeat,
        Some("suspended") => TryOutcome::Suspended,
        Some("insufficient_funds") => TryOutcome::InsufficientFunds,
        other => {
            return Err(WalletError::Stored(UnknownValue {
                kind: "wallet_try outcome",
                value: other.unwrap_or("NULL").to_string(),
            }))
        }
    })
}

/// Confirm: the frozen amount is spent on the order.
pub async fn confirm(db: &MySqlPool, tx_id: &str) -> Result<EndOutcome, WalletError> {
    retry_on_deadlock(|| end_once(db, tx_id, FencePhase::Confirm)).await
}

/// Cancel: the frozen amount goes back to the balance (or, with no Try
/// before it, the Cancel is recorded so a late Try is refused).
pub async fn cancel(db: &MySqlPool, tx_id: &str) -> Result<EndOutcome, WalletError> {
    retry_on_deadlock(|| end_once(db, tx_id, FencePhase::Cancel)).await
}

/// The `wallet_end` procedure: fence and the movement of what the Try
/// froze (for the order its fence recorded), one round trip. A fence whose
/// frozen money is not there is [`WalletError::Inconsistent`].
async fn end_once(
    db: &MySqlPool,
    tx_id: &str,
    phase: FencePhase,
) -> Result<EndOutcome, WalletError> {
    let outcome: Option<String> = sqlx::query_scalar("CALL wallet_end(?, ?)")
        .bind(tx_id)
        .bind(phase)
        .fetch_one(db)
        .await
        .map_err(|e| match fence::contradicted(&e, tx_id) {
            Some(what) => WalletError::Inconsistent(what),
            None => WalletError::Db(e),
        })?;
    Ok(EndOutcome::from_procedure(
        "wallet_end outcome",
        outcome.as_deref(),
    )?)
}
