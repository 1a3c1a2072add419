//! The order's branch of a payment, in the order database.
//!
//! TCC: Try holds the order (`unpaid → paying`, only the buyer's own, only
//! before it expires), Confirm marks it paid, Cancel gives it back
//! (`paying → unpaid`; an expired one is then closed by the closer as
//! usual). Each step is one local transaction with its fence step
//! ([`super::fence`]), run as one stored procedure call (`order_try`,
//! `order_end` in `migrations/*_order_branch_steps.sql`): the database
//! runs the step's statements without a round trip between them. It
//! locks one order row and no sale row: the order
//! writer and the closer lock the sale first, then orders, and a step
//! that waits on nothing after its order row cannot close a cycle with
//! them (nor queue behind a batch write of the sale).
//!
//! XA: [`xa_prepare`] marks the order paid inside a prepared XA branch;
//! the order row stays locked until phase two, so neither the closer nor
//! a second payment can move it meanwhile. It takes no sale lock: the
//! branch may stay prepared for as long as a payment is in doubt, and the
//! order writer needs the sale row.

use sqlx::{MySqlConnection, MySqlPool};

use super::fence::{self, EndOutcome, FenceError};
use super::log::{LogError, PayTx};
use super::xa_branch::{BranchConn, XaError, Xid};
use crate::orders::{retry_on_deadlock, MaybeDeadlock};
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

/// Try: hold `order_id` (the buyer's, unpaid, not expired) for `tx_id`.
pub async fn hold(
    db: &MySqlPool,
    tx_id: &str,
    user_id: u64,
    order_id: &str,
) -> Result<HoldOutcome, BranchError> {
    let tx = Try {
        tx_id,
        user_id,
        order_id,
        log: None,
    };
    retry_on_deadlock(|| try_once(db, &tx)).await
}

/// Logs `tx` as `started` and holds its order, in one local transaction
/// (the coordinator's log lives in this database): a logged transaction
/// has always held its order, and a refused one is logged `aborted` with
/// nothing held anywhere, so nobody has anything to cancel.
pub async fn log_and_hold(db: &MySqlPool, tx: &PayTx) -> Result<HoldOutcome, BranchError> {
    let attempt = Try {
        tx_id: &tx.tx_id,
        user_id: tx.user_id,
        order_id: &tx.order_id,
        log: Some(tx),
    };
    retry_on_deadlock(|| try_once(db, &attempt)).await
}

/// One Try's arguments.
struct Try<'a> {
    tx_id: &'a str,
    user_id: u64,
    order_id: &'a str,
    /// The transaction to log as `started` with the hold, if any.
    log: Option<&'a PayTx>,
}

/// The `order_try` procedure: fence, hold and log in one local
/// transaction, one round trip.
async fn try_once(db: &MySqlPool, t: &Try<'_>) -> Result<HoldOutcome, BranchError> {
    let outcome: Option<String> = sqlx::query_scalar("CALL order_try(?, ?, ?, ?, ?, ?, ?)")
        .bind(t.tx_id)
        .bind(t.user_id)
        .bind(t.order_id)
        .bind(t.log.is_some())
        .bind(t.log.map_or(0, |l| l.amount_cents))
        .bind(t.log.map(|l| l.mode.as_str()))
        .bind(AbortReason::OrderNotPayable)
        .fetch_one(db)
        .await?;
    Ok(match outcome.as_deref() {
        Some("held") => HoldOutcome::Held,
        Some("repeat") => HoldOutcome::Repeat,
        Some("refused") => HoldOutcome::Refused,
        other => return Err(unexpected_outcome("order_try outcome", other)),
    })
}

/// Confirm: the held order is paid.
pub async fn confirm(db: &MySqlPool, tx_id: &str) -> Result<EndOutcome, BranchError> {
    retry_on_deadlock(|| end_once(db, tx_id, FencePhase::Confirm, false)).await
}

/// The coordinator's decision to commit (`started → committing` in the
/// log) and the Confirm of the order's branch, in one local transaction;
/// `None` (nothing done) when the transaction was no longer `started`:
/// recovery decided first.
pub async fn decide_and_confirm(
    db: &MySqlPool,
    tx_id: &str,
) -> Result<Option<EndOutcome>, BranchError> {
    match retry_on_deadlock(|| end_once(db, tx_id, FencePhase::Confirm, true)).await {
        Err(BranchError::NotDecided) => Ok(None),
        other => other.map(Some),
    }
}

/// Cancel: the held order is unpaid again (or, with no Try before it, the
/// Cancel is recorded so a late Try is refused).
pub async fn cancel(db: &MySqlPool, tx_id: &str) -> Result<EndOutcome, BranchError> {
    retry_on_deadlock(|| end_once(db, tx_id, FencePhase::Cancel, false)).await
}

/// One Confirm or Cancel (the `order_end` procedure); with `decide`,
/// first the log's `started → committing`.
async fn end_once(
    db: &MySqlPool,
    tx_id: &str,
    phase: FencePhase,
    decide: bool,
) -> Result<EndOutcome, BranchError> {
    let outcome: Option<String> = sqlx::query_scalar("CALL order_end(?, ?, ?)")
        .bind(tx_id)
        .bind(phase)
        .bind(decide)
        .fetch_one(db)
        .await
        .map_err(|e| inconsistent_order(e, tx_id))?;
    if outcome.as_deref() == Some("not_decided") {
        return Err(BranchError::NotDecided);
    }
    Ok(EndOutcome::from_procedure(
        "order_end outcome",
        outcome.as_deref(),
    )?)
}

/// A fence that says `held` over an order row that is not `paying` is
/// [`BranchError::Inconsistent`].
fn inconsistent_order(e: sqlx::Error, tx_id: &str) -> BranchError {
    match fence::contradicted(&e, tx_id) {
        Some(what) => BranchError::Inconsistent(what),
        None => BranchError::Db(e),
    }
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

/// Confirm inside the caller's transaction (which has locked the sale's
/// row already): the `message` mode settles a payment together with the
/// message that announced it.
pub(crate) async fn confirm_in(
    conn: &mut MySqlConnection,
    tx_id: &str,
) -> Result<EndOutcome, BranchError> {
    let outcome: Option<String> = sqlx::query_scalar("CALL order_end_in_row(?, ?)")
        .bind(tx_id)
        .bind(FencePhase::Confirm)
        .fetch_one(conn)
        .await
        .map_err(|e| inconsistent_order(e, tx_id))?;
    Ok(EndOutcome::from_procedure(
        "order_end_in outcome",
        outcome.as_deref(),
    )?)
}

pub(crate) async fn lock_sale(conn: &mut MySqlConnection, sale_id: u64) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT id FROM sales WHERE id = ? LOCK IN SHARE MODE")
        .bind(sale_id)
        .execute(conn)
        .await?;
    Ok(())
}
