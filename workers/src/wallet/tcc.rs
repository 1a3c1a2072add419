//! The wallet's branch of a TCC payment: Try freezes the order's amount,
//! Confirm spends the frozen money (the order's one debit), Cancel gives
//! it back. Each step is one local transaction of the wallet's database
//! holding the fence step ([`crate::payments::fence`]) and the movement
//! it allows, so the coordinator may repeat, reorder or lose any call.

use serde::{Deserialize, Serialize};
use sqlx::MySqlPool;

use crate::orders::retry_on_deadlock;

use super::accounts::{self, Movement, WalletError};
use crate::payments::fence::{self, CancelStart, ConfirmStart, EndOutcome, Held, TryStart};
use crate::statuses::{FencePhase, LedgerKind};

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

async fn try_freeze_once(
    db: &MySqlPool,
    tx_id: &str,
    user_id: u64,
    order_id: &str,
    amount_cents: i64,
) -> Result<TryOutcome, WalletError> {
    let mut tx = db.begin().await?;
    let held = Held {
        resource: user_id.to_string(),
        amount_cents,
        order_id: Some(order_id.to_string()),
    };
    let outcome = match fence::begin_try(&mut tx, tx_id, BRANCH, &held).await? {
        TryStart::Repeat => TryOutcome::Repeat,
        TryStart::Suspended => TryOutcome::Suspended,
        TryStart::Fresh => {
            let freeze = Movement {
                user_id,
                kind: LedgerKind::Freeze,
                amount_cents,
                order_id: Some(order_id),
                tx_id: Some(tx_id),
            };
            if !accounts::apply(&mut tx, &freeze, false).await? {
                // Not even the fence row stays: a later Cancel is empty.
                tx.rollback().await?;
                return Ok(TryOutcome::InsufficientFunds);
            }
            TryOutcome::Frozen
        }
    };
    tx.commit().await?;
    Ok(outcome)
}

/// Confirm: the frozen amount is spent on the order.
pub async fn confirm(db: &MySqlPool, tx_id: &str) -> Result<EndOutcome, WalletError> {
    retry_on_deadlock(|| confirm_once(db, tx_id)).await
}

async fn confirm_once(db: &MySqlPool, tx_id: &str) -> Result<EndOutcome, WalletError> {
    let mut tx = db.begin().await?;
    let outcome = match fence::begin_confirm(&mut tx, tx_id, BRANCH).await? {
        ConfirmStart::Repeat => EndOutcome::Repeat,
        ConfirmStart::NotTried | ConfirmStart::Cancelled => EndOutcome::Refused,
        ConfirmStart::Apply(held) => {
            move_held(&mut tx, tx_id, &held, LedgerKind::Debit).await?;
            fence::finish(&mut tx, tx_id, BRANCH, FencePhase::Confirm).await?;
            EndOutcome::Done
        }
    };
    tx.commit().await?;
    Ok(outcome)
}

/// Cancel: the frozen amount goes back to the balance (or, with no Try
/// before it, the Cancel is recorded so a late Try is refused).
pub async fn cancel(db: &MySqlPool, tx_id: &str) -> Result<EndOutcome, WalletError> {
    retry_on_deadlock(|| cancel_once(db, tx_id)).await
}

async fn cancel_once(db: &MySqlPool, tx_id: &str) -> Result<EndOutcome, WalletError> {
    let mut tx = db.begin().await?;
    let outcome = match fence::begin_cancel(&mut tx, tx_id, BRANCH).await? {
        CancelStart::Empty => EndOutcome::EmptyRollback,
        CancelStart::Repeat => EndOutcome::Repeat,
        CancelStart::Confirmed => EndOutcome::Refused,
        CancelStart::Undo(held) => {
            move_held(&mut tx, tx_id, &held, LedgerKind::Unfreeze).await?;
            fence::finish(&mut tx, tx_id, BRANCH, FencePhase::Cancel).await?;
            EndOutcome::Done
        }
    };
    tx.commit().await?;
    Ok(outcome)
}

/// Moves what the Try froze (debit or unfreeze), for the order the Try
/// recorded in its freeze row.
async fn move_held(
    conn: &mut sqlx::MySqlConnection,
    tx_id: &str,
    held: &Held,
    kind: LedgerKind,
) -> Result<(), WalletError> {
    let user_id: u64 = held
        .resource
        .parse()
        .map_err(|_| WalletError::Inconsistent {
            user_id: 0,
            what: format!("fence of {tx_id} holds {:?}, not a user id", held.resource),
        })?;
    let order_id = match &held.order_id {
        Some(id) => Some(id.clone()),
        // A fence written before it kept the order: the Try's ledger row has it.
        None => {
            sqlx::query_scalar("SELECT order_id FROM wallet_ledger WHERE tx_id = ? AND kind = ?")
                .bind(tx_id)
                .bind(LedgerKind::Freeze)
                .fetch_optional(&mut *conn)
                .await?
                .flatten()
        }
    };
    let movement = Movement {
        user_id,
        kind,
        amount_cents: held.amount_cents,
        order_id: order_id.as_deref(),
        tx_id: Some(tx_id),
    };
    if !accounts::apply(conn, &movement, true).await? {
        return Err(WalletError::Inconsistent {
            user_id,
            what: format!(
                "{tx_id}: the frozen {} cents are not there",
                held.amount_cents
            ),
        });
    }
    Ok(())
}
