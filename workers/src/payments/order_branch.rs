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
//! XA: [`OrderGroupBranch`] marks a group's orders paid inside one
//! prepared XA branch; the order rows stay locked until phase two, so
//! neither the closer nor a second payment can move them meanwhile. It takes no sale lock: the
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

/// XA: the order side of a group of payments, one branch named
/// (`group`, `order`) for all of them. [`lock`](Self::lock) starts it and
/// locks the orders that can be paid; the wallet then prepares its side;
/// [`prepare`](Self::prepare) marks paid the orders the wallet debited
/// and prepares. Until then the branch is only active: a crash rolls it
/// back with its connection.
pub struct OrderGroupBranch {
    branch: BranchConn,
}

impl OrderGroupBranch {
    /// `XA START`, then locks (in id order, by primary key only: a scan
    /// would lock every row it passes) the orders of `txs` their buyer may
    /// pay now: the buyer's own, unpaid, unexpired. Says for each of `txs`
    /// whether it can go on. One cannot when another payment of its order
    /// is in this group, or holds the row (another group's branch, in
    /// doubt perhaps until recovery): that row is skipped, not waited for,
    /// so one order held elsewhere never stalls the whole group.
    pub async fn lock(
        db: &MySqlPool,
        group: &str,
        txs: &[PayTx],
    ) -> Result<(OrderGroupBranch, Vec<bool>), BranchError> {
        let mut branch = BranchConn::start(db, Xid::new(group, BRANCH)?).await?;
        let sql = format!(
            "SELECT id, user_id FROM orders FORCE INDEX (PRIMARY) WHERE id IN ({}) \
             AND status = ? AND expires_at > NOW(3) ORDER BY id FOR UPDATE SKIP LOCKED",
            vec!["?"; txs.len()].join(", ")
        );
        let mut query = sqlx::query_as::<_, (String, u64)>(&sql);
        for tx in txs {
            query = query.bind(&tx.order_id);
        }
        let payable = query
            .bind(OrderStatus::Unpaid)
            .fetch_all(branch.conn())
            .await?;
        let mut claimed = std::collections::HashSet::new();
        let can_go = txs
            .iter()
            .map(|tx| {
                payable
                    .iter()
                    .any(|(id, user)| *id == tx.order_id && *user == tx.user_id)
                    && claimed.insert(tx.order_id.as_str())
            })
            .collect();
        Ok((OrderGroupBranch { branch }, can_go))
    }

    /// Marks `order_ids` (locked by [`lock`](Self::lock)) paid, then
    /// `XA END` + `XA PREPARE`; the prepared branch, for phase two.
    pub async fn prepare(mut self, order_ids: &[&str]) -> Result<BranchConn, BranchError> {
        let sql = format!(
            "UPDATE orders FORCE INDEX (PRIMARY) SET status = ?, paid_at = NOW(3) \
             WHERE id IN ({}) AND status = ?",
            vec!["?"; order_ids.len()].join(", ")
        );
        let mut query = sqlx::query(&sql).bind(OrderStatus::Paid);
        for id in order_ids {
            query = query.bind(*id);
        }
        let changed = query
            .bind(OrderStatus::Unpaid)
            .execute(self.branch.conn())
            .await?
            .rows_affected();
        if changed != order_ids.len() as u64 {
            return Err(BranchError::Inconsistent(format!(
                "group {}: {changed} of {} locked orders marked paid",
                self.branch.xid().tx_id(),
                order_ids.len()
            )));
        }
        self.branch.prepare().await?;
        Ok(self.branch)
    }

    /// Ends the branch without preparing it: nothing of it was durable.
    pub async fn give_up(self) -> Result<(), BranchError> {
        Ok(self.branch.rollback_active().await?)
    }
}
