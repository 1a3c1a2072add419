//! The wallet's branch of a TCC payment: Try freezes the order's amount,
//! Confirm spends the frozen money (the order's one debit), Cancel gives
//! it back. Each step is one local transaction of the wallet's database
//! holding the fence step ([`crate::payments::fence`]) and the movement
//! it allows, so the coordinator may repeat, reorder or lose any call.
//! Each step runs in a stored procedure
//! (`migrations/wallet/*_wallet_set_steps.sql`) together with the same
//! step of other payments ([`crate::group_commit`]): the database runs the
//! steps' statements without a round trip between them and commits them
//! once, as a few statements for the whole group when every item is the
//! plain case, else item by item (`*_wallet_step_groups.sql`).

use serde::{Deserialize, Serialize};
use sqlx::MySqlPool;

use crate::group_commit::{self, GroupCommit, GroupLimits};

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

/// The wallet branch's TCC steps as the service runs them under load:
/// each joins a group of the same step of other payments, run as one
/// local transaction ([`crate::group_commit`]). The free functions below
/// run a step alone, as a group of one (tools, tests).
pub struct WalletSteps {
    tries: GroupCommit<TryItem, TryOutcome, WalletError>,
    ends: GroupCommit<EndItem, EndOutcome, WalletError>,
}

impl WalletSteps {
    /// Starts the steps' runners on the current runtime.
    pub fn start(db: &MySqlPool, limits: GroupLimits) -> WalletSteps {
        WalletSteps {
            tries: GroupCommit::start(limits, group_commit::on_pool(db, try_group)),
            ends: GroupCommit::start(limits, group_commit::on_pool(db, end_group)),
        }
    }

    /// See [`try_freeze`].
    pub async fn try_freeze(
        &self,
        tx_id: &str,
        user_id: u64,
        order_id: &str,
        amount_cents: i64,
    ) -> Result<TryOutcome, WalletError> {
        self.tries
            .run(TryItem::new(tx_id, user_id, order_id, amount_cents))
            .await
    }

    /// See [`confirm`].
    pub async fn confirm(&self, tx_id: &str) -> Result<EndOutcome, WalletError> {
        self.ends
            .run(EndItem::new(tx_id, FencePhase::Confirm))
            .await
    }

    /// See [`cancel`].
    pub async fn cancel(&self, tx_id: &str) -> Result<EndOutcome, WalletError> {
        self.ends.run(EndItem::new(tx_id, FencePhase::Cancel)).await
    }
}

/// Try: freeze `amount_cents` of `user_id`'s balance for `order_id`.
pub async fn try_freeze(
    db: &MySqlPool,
    tx_id: &str,
    user_id: u64,
    order_id: &str,
    amount_cents: i64,
) -> Result<TryOutcome, WalletError> {
    let item = TryItem::new(tx_id, user_id, order_id, amount_cents);
    group_commit::alone(&group_commit::on_pool(db, try_group), item).await
}

/// Confirm: the frozen amount is spent on the order.
pub async fn confirm(db: &MySqlPool, tx_id: &str) -> Result<EndOutcome, WalletError> {
    group_commit::alone(
        &group_commit::on_pool(db, end_group),
        EndItem::new(tx_id, FencePhase::Confirm),
    )
    .await
}

/// Cancel: the frozen amount goes back to the balance (or, with no Try
/// before it, the Cancel is recorded so a late Try is refused).
pub async fn cancel(db: &MySqlPool, tx_id: &str) -> Result<EndOutcome, WalletError> {
    group_commit::alone(
        &group_commit::on_pool(db, end_group),
        EndItem::new(tx_id, FencePhase::Cancel),
    )
    .await
}

/// One Try of a group. Groups run in this order: by user, the wallet row
/// a Try locks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct TryItem {
    user_id: u64,
    tx_id: String,
    order_id: String,
    amount_cents: i64,
}

impl TryItem {
    fn new(tx_id: &str, user_id: u64, order_id: &str, amount_cents: i64) -> TryItem {
        TryItem {
            user_id,
            tx_id: tx_id.to_string(),
            order_id: order_id.to_string(),
            amount_cents,
        }
    }
}

/// The `wallet_try_set` procedure: for each Try, fence and freeze (set
/// statements for a group of plain Tries, else `wallet_try_group`).
async fn try_group(
    db: MySqlPool,
    items: Vec<TryItem>,
) -> Result<Vec<Result<TryOutcome, WalletError>>, WalletError> {
    let args: Vec<serde_json::Value> = items
        .iter()
        .map(|t| serde_json::json!([t.tx_id, t.user_id, t.order_id, t.amount_cents]))
        .collect();
    let outcomes = group_commit::call_procedure(&db, "CALL wallet_try_set(?)", &args, &[]).await?;
    Ok(outcomes
        .into_iter()
        .map(|o| match o.as_deref() {
            Some("frozen") => Ok(TryOutcome::Frozen),
            Some("repeat") => Ok(TryOutcome::Repeat),
            Some("suspended") => Ok(TryOutcome::Suspended),
            Some("insufficient_funds") => Ok(TryOutcome::InsufficientFunds),
            other => Err(unknown("wallet_try outcome", other)),
        })
        .collect())
}

/// One Confirm or Cancel of a group. Groups run in this order: by
/// transaction, the fence row an end locks first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct EndItem {
    tx_id: String,
    phase: FencePhase,
}

impl EndItem {
    fn new(tx_id: &str, phase: FencePhase) -> EndItem {
        EndItem {
            tx_id: tx_id.to_string(),
            phase,
        }
    }
}

/// The `wallet_end_set` procedure (else `wallet_end_group`): for each end, the fence and the
/// movement of what the Try froze (for the order its fence recorded). A
/// fence whose frozen money is not there is [`WalletError::Inconsistent`],
/// for that item alone.
async fn end_group(
    db: MySqlPool,
    items: Vec<EndItem>,
) -> Result<Vec<Result<EndOutcome, WalletError>>, WalletError> {
    let args: Vec<serde_json::Value> = items
        .iter()
        .map(|e| serde_json::json!([e.tx_id, e.phase.as_str()]))
        .collect();
    let outcomes = group_commit::call_procedure(&db, "CALL wallet_end_set(?)", &args, &[]).await?;
    Ok(items
        .iter()
        .zip(outcomes)
        .map(|(item, o)| match o.as_deref() {
            Some(text) if text.starts_with(fence::CONTRADICTED) => {
                Err(WalletError::Inconsistent(format!("{}: {text}", item.tx_id)))
            }
            other => Ok(EndOutcome::from_procedure("wallet_end outcome", other)?),
        })
        .collect())
}

/// A procedure's answer that is none of the outcomes it may give.
pub(super) fn unknown(kind: &'static str, answer: Option<&str>) -> WalletError {
    WalletError::Stored(UnknownValue {
        kind,
        value: answer.unwrap_or("NULL").to_string(),
    })
}
