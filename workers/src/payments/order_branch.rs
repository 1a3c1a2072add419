//! The order's branch of a payment, in the order database.
//!
//! TCC: Try holds the order (`unpaid → paying`, only the buyer's own, only
//! before it expires), Confirm marks it paid, Cancel gives it back
//! (`paying → unpaid`; an expired one is then closed by the closer as
//! usual). Each step is its fence step ([`super::fence`]) and the change
//! it guards, run by a stored procedure (`order_try_set`, `order_end_set`
//! in `migrations/*_set_based_steps.sql`) together with the same step of
//! other payments ([`crate::group_commit`]): the database runs the steps'
//! statements without a round trip between them and commits them once,
//! as a few statements for the whole group when every item is the plain
//! case, else item by item (`order_try_group`, `order_end_group`). A step locks its order row and no sale row, so
//! it never queues behind a batch write of the sale. A group holds several
//! order rows, and the closer (sale first, then its orders) can meet it
//! in a cycle; InnoDB then rolls one back and the group runs again.
//!
//! XA: [`xa_prepare`] marks the order paid inside a prepared XA branch;
//! the order row stays locked until phase two, so neither the closer nor
//! a second payment can move it meanwhile. It takes no sale lock: the
//! branch may stay prepared for as long as a payment is in doubt, and the
//! order writer needs the sale row.

use sqlx::MySqlPool;

use super::fence::{self, EndOutcome, FenceError};
use super::log::{LogError, PayTx};
use super::xa_branch::{BranchConn, XaError, Xid};
use crate::group_commit::{self, GroupCommit, GroupLimits};
use crate::orders::MaybeDeadlock;
use crate::statuses::{AbortReason, FencePhase, OrderStatus};

/// This branch's name in the fence.
pub const BRANCH: &str = "order";

/// Why a branch step failed (as opposed to what it decided).
#[derive(Debug, thiserror::Error)]
pub enum BranchError {
    #[error(transparent)]
    Fence(#[from] FenceError),
    #[error("MySQL: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Xa(#[from] XaError),
    #[error(transparent)]
    Log(#[from] LogError),
    /// A decision to commit came too late: the log had moved on.
    #[error("the transaction is no longer `started`")]
    NotDecided,
    /// The fence says the order is held, the order row says otherwise.
    #[error("{0}")]
    Inconsistent(String),
}

impl MaybeDeadlock for BranchError {
    fn is_deadlock(&self) -> bool {
        match self {
            BranchError::Db(e)
            | BranchError::Fence(FenceError::Db(e))
            | BranchError::Xa(XaError::Db(e))
            | BranchError::Log(LogError::Db(e)) => e.is_deadlock(),
            _ => false,
        }
    }
}

/// What a Try did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldOutcome {
    /// The order is `paying` for this transaction.
    Held,
    /// Held by an earlier Try of this transaction.
    Repeat,
    /// Cancelled before it arrived, or the order is not the buyer's, not
    /// unpaid, or expired: nothing held.
    Refused,
}

/// The order branch's TCC steps as the coordinator runs them under load:
/// each joins a group of the same step of other payments, run as one
/// local transaction ([`crate::group_commit`]). The free functions below
/// run a step alone, as a group of one (tools, tests).
pub struct OrderSteps {
    tries: GroupCommit<TryItem, HoldOutcome, BranchError>,
    ends: GroupCommit<EndItem, EndOutcome, BranchError>,
}

impl OrderSteps {
    /// Starts the steps' runners on the current runtime.
    pub fn start(db: &MySqlPool, limits: GroupLimits) -> OrderSteps {
        OrderSteps {
            tries: GroupCommit::start(limits, group_commit::on_pool(db, try_group)),
            ends: GroupCommit::start(limits, group_commit::on_pool(db, end_group)),
        }
    }

    /// Logs `tx` as `started` and holds its order, in one local transaction
    /// (the coordinator's log lives in this database): a logged transaction
    /// has always held its order, and a refused one is logged `aborted` with
    /// nothing held anywhere, so nobody has anything to cancel.
    pub async fn log_and_hold(&self, tx: &PayTx) -> Result<HoldOutcome, BranchError> {
        self.tries.run(TryItem::logged(tx)).await
    }

    /// See [`confirm`].
    pub async fn confirm(&self, tx_id: &str) -> Result<EndOutcome, BranchError> {
        self.ends
            .run(EndItem::new(tx_id, FencePhase::Confirm, false))
            .await
    }

    /// The coordinator's decision to commit (`started → committing` in the
    /// log) and the Confirm of the order's branch, in one local transaction;
    /// `None` (nothing done) when the transaction was no longer `started`:
    /// recovery decided first.
    pub async fn decide_and_confirm(&self, tx_id: &str) -> Result<Option<EndOutcome>, BranchError> {
        match self
            .ends
            .run(EndItem::new(tx_id, FencePhase::Confirm, true))
            .await
        {
            Err(BranchError::NotDecided) => Ok(None),
            other => other.map(Some),
        }
    }

    /// See [`cancel`].
    pub async fn cancel(&self, tx_id: &str) -> Result<EndOutcome, BranchError> {
        self.ends
            .run(EndItem::new(tx_id, FencePhase::Cancel, false))
            .await
    }
}

/// Try: hold `order_id` (the buyer's, unpaid, not expired) for `tx_id`.
pub async fn hold(
    db: &MySqlPool,
    tx_id: &str,
    user_id: u64,
    order_id: &str,
) -> Result<HoldOutcome, BranchError> {
    let item = TryItem {
        order_id: order_id.to_string(),
        tx_id: tx_id.to_string(),
        user_id,
        log: None,
    };
    group_commit::alone(&group_commit::on_pool(db, try_group), item).await
}

/// Confirm: the held order is paid.
pub async fn confirm(db: &MySqlPool, tx_id: &str) -> Result<EndOutcome, BranchError> {
    let item = EndItem::new(tx_id, FencePhase::Confirm, false);
    group_commit::alone(&group_commit::on_pool(db, end_group), item).await
}

/// Cancel: the held order is unpaid again (or, with no Try before it, the
/// Cancel is recorded so a late Try is refused).
pub async fn cancel(db: &MySqlPool, tx_id: &str) -> Result<EndOutcome, BranchError> {
    let item = EndItem::new(tx_id, FencePhase::Cancel, false);
    group_commit::alone(&group_commit::on_pool(db, end_group), item).await
}

/// One Try of a group. Groups run in this order: by order, the row a Try
/// locks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct TryItem {
    order_id: String,
    tx_id: String,
    user_id: u64,
    /// The transaction's amount and mode, to log it as `started` with
    /// the hold, if it is to be logged.
    log: Option<(i64, &'static str)>,
}

impl TryItem {
    fn logged(tx: &PayTx) -> TryItem {
        TryItem {
            order_id: tx.order_id.clone(),
            tx_id: tx.tx_id.clone(),
            user_id: tx.user_id,
            log: Some((tx.amount_cents, tx.mode.as_str())),
        }
    }
}

/// The `order_try_set` procedure: for each Try, fence, hold and log.
async fn try_group(
    db: MySqlPool,
    items: Vec<TryItem>,
) -> Result<Vec<Result<HoldOutcome, BranchError>>, BranchError> {
    let args: Vec<serde_json::Value> = items
        .iter()
        .map(|t| {
            let (amount_cents, mode) = t.log.unzip();
            serde_json::json!([
                t.tx_id,
                t.user_id,
                t.order_id,
                u8::from(t.log.is_some()),
                amount_cents.unwrap_or(0),
                mode
            ])
        })
        .collect();
    let reason = [AbortReason::OrderNotPayable.as_str()];
    let outcomes =
        group_commit::call_procedure(&db, "CALL order_try_set(?, ?)", &args, &reason).await?;
    Ok(outcomes
        .into_iter()
        .map(|o| match o.as_deref() {
            Some("held") => Ok(HoldOutcome::Held),
            Some("repeat") => Ok(HoldOutcome::Repeat),
            Some("refused") => Ok(HoldOutcome::Refused),
            other => Err(unexpected_outcome("order_try outcome", other)),
        })
        .collect())
}

/// One Confirm or Cancel of a group; with `decide`, first the log's
/// `started → committing`. Groups run in this order: by transaction, the
/// fence row an end locks first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct EndItem {
    tx_id: String,
    phase: FencePhase,
    decide: bool,
}

impl EndItem {
    fn new(tx_id: &str, phase: FencePhase, decide: bool) -> EndItem {
        EndItem {
            tx_id: tx_id.to_string(),
            phase,
            decide,
        }
    }
}

/// The `order_end_set` procedure. A fence that says `held` over an
/// order row that is not `paying` is [`BranchError::Inconsistent`], for
/// that item alone.
async fn end_group(
    db: MySqlPool,
    items: Vec<EndItem>,
) -> Result<Vec<Result<EndOutcome, BranchError>>, BranchError> {
    let args: Vec<serde_json::Value> = items
        .iter()
        .map(|e| serde_json::json!([e.tx_id, e.phase.as_str(), u8::from(e.decide)]))
        .collect();
    let outcomes = group_commit::call_procedure(&db, "CALL order_end_set(?)", &args, &[]).await?;
    Ok(items
        .iter()
        .zip(outcomes)
        .map(|(item, o)| match o.as_deref() {
            Some("not_decided") => Err(BranchError::NotDecided),
            Some(text) if text.starts_with(fence::CONTRADICTED) => {
                Err(BranchError::Inconsistent(format!("{}: {text}", item.tx_id)))
            }
            other => Ok(EndOutcome::from_procedure("order_end outcome", other)?),
        })
        .collect())
}

fn unexpected_outcome(kind: &'static str, answer: Option<&str>) -> BranchError {
    BranchError::Log(LogError::Stored(crate::statuses::UnknownValue {
        kind,
        value: answer.unwrap_or("NULL").to_string(),
    }))
}

/// XA: the order paid inside a prepared branch named (`tx_id`, `order`),
/// or `None` when the order is not the buyer's unpaid, unexpired order
/// (nothing prepared).
pub async fn xa_prepare(
    db: &MySqlPool,
    tx_id: &str,
    user_id: u64,
    order_id: &str,
) -> Result<Option<BranchConn>, BranchError> {
    let mut branch = BranchConn::start(db, Xid::new(tx_id, BRANCH)?).await?;
    let changed = sqlx::query(
        "UPDATE orders SET status = ?, paid_at = NOW(3) \
         WHERE id = ? AND user_id = ? AND status = ? AND expires_at > NOW(3)",
    )
    .bind(OrderStatus::Paid)
    .bind(order_id)
    .bind(user_id)
    .bind(OrderStatus::Unpaid)
    .execute(branch.conn())
    .await?
    .rows_affected();
    if changed != 1 {
        branch.rollback_active().await?;
        return Ok(None);
    }
    branch.prepare().await?;
    Ok(Some(branch))
}
