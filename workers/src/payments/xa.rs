//! XA: the api coordinates payments as a two-phase commit over MariaDB XA
//! branches, one in each database, with its decision in the log before
//! phase two. The payments in hand at once run as one *group*: one branch
//! per database carries all of them, so a group of 64 costs the databases
//! two durable prepares and two commits, not 64 of each.
//!
//! ```text
//!  log started (all) ─▶ order branch: XA START, lock the payable orders
//!     ─▶ wallet prepares the debits it covers (one branch)
//!     ─▶ order branch: mark those paid, prepare
//!     ─▶ log committing (all of them, or none) ─▶ commit wallet ─▶ commit order ─▶ log ended
//!  (the wallet silent, or nothing to pay) ─▶ log aborting ─▶ roll back wallet, order ─▶ log ended
//! ```
//!
//! A payment that cannot go on (its order not payable, money short) is in
//! no branch: it is logged `aborting`, then `aborted` with its group. The
//! group's decision is one statement over the payments its branches
//! carry, so they are all committed or all rolled back.
//!
//! Unlike TCC, nothing is visible before phase two: the orders are not
//! `paying`, they are locked (a second payment or the closer waits on the
//! row), and the money is not frozen, it is debited inside a branch no one
//! else can see. A crash leaves prepared branches in `XA RECOVER`, locks
//! held; [`recover_group`] ends them as the log says: a group with an
//! undecided payment is aborted, a decided one finished, and
//! [`end_orphans`] ends a branch prepared for a group the log has already
//! ended (a prepare that landed after its abort).
//!
//! The order branch's connection stays with the group that prepared it,
//! so phase two on it is one statement; a wallet instance likewise holds
//! its branch ([`crate::wallet::xa`]). Fail points (the `fail` crate, only
//! with the `failpoints` feature) after every step cut the group short as
//! a dying process would; the branch connection it held then closes, and
//! the branch waits for recovery.

use std::cmp::Ordering;
use std::sync::Arc;

use sqlx::MySqlPool;

use super::fence::EndOutcome;
use super::log::{self, PayTx};
use super::order_branch::{OrderGroupBranch, BRANCH as ORDER};
use super::wallet_client::{WalletCallError, WalletClient};
use super::xa_branch::{self, BranchConn, Detached, Xid};
use super::{wallet_failure, PayError, Payments, Step};
use crate::group_commit::{GroupCommit, GroupLimits, RunGroup};
use crate::statuses::{AbortReason, OrderStatus, TxState};
use crate::wallet::routes::PrepareRequest;
use crate::wallet::xa::{Debit, PrepareOutcome, Prepared};

/// What a group runs against: the order database, the log's own
/// connections (an XA branch cannot share its session), the wallet.
pub struct Sides<'a> {
    pub db: &'a MySqlPool,
    pub log_db: &'a MySqlPool,
    pub wallet: &'a WalletClient,
}

/// The api's XA payments, queued into groups ([`crate::group_commit`]):
/// a runner takes every payment waiting (up to `group_commit_max`) as one
/// group, `group_commits_in_flight` groups at once.
pub struct XaGroups(GroupCommit<XaItem, Step, PayError>);

struct Owned {
    db: MySqlPool,
    log_db: MySqlPool,
    wallet: Arc<WalletClient>,
}

impl XaGroups {
    /// Starts the runners on the current runtime.
    pub fn start(
        db: &MySqlPool,
        log_db: &MySqlPool,
        wallet: Arc<WalletClient>,
        limits: GroupLimits,
    ) -> XaGroups {
        let owned = Arc::new(Owned {
            db: db.clone(),
            log_db: log_db.clone(),
            wallet,
        });
        let run: RunGroup<XaItem, Step, PayError> = Arc::new(move |items| {
            let owned = owned.clone();
            Box::pin(async move {
                let sides = Sides {
                    db: &owned.db,
                    log_db: &owned.log_db,
                    wallet: &owned.wallet,
                };
                Ok(run_group(&sides, items).await)
            })
        });
        XaGroups(GroupCommit::start(limits, run))
    }
}

/// One payment of a group; by order, the row its branch locks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XaItem(PayTx);

impl Ord for XaItem {
    fn cmp(&self, other: &Self) -> Ordering {
        (&self.0.order_id, &self.0.tx_id).cmp(&(&other.0.order_id, &other.0.tx_id))
    }
}

impl PartialOrd for XaItem {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Pays `tx` in the next group.
pub async fn pay(p: &Payments, tx: &PayTx) -> Result<Step, PayError> {
    p.xa_groups().0.run(XaItem(tx.clone())).await
}

/// Runs a group; a failure of the group is every payment's.
async fn run_group(s: &Sides<'_>, items: Vec<XaItem>) -> Vec<Result<Step, PayError>> {
    let txs: Vec<PayTx> = items.into_iter().map(|i| i.0).collect();
    match pay_group(s, &txs).await {
        Ok(steps) => steps.into_iter().map(Ok).collect(),
        Err(e) => {
            tracing::warn!(size = txs.len(), error = %e, "an XA payment group was cut short; recovery ends it");
            txs.iter().map(|_| Err(e.for_each_payment())).collect()
        }
    }
}

/// Where the order branch of a group is.
pub enum OrderSide {
    /// Prepared, on this connection.
    Prepared(BranchConn),
    /// Ended here without being prepared (nothing of it is durable).
    Ended,
    /// Unknown to this process (recovery): ended from any session.
    Elsewhere,
}

/// A group's payments, from the log's `started` to their ends (see the
/// module's sketch); one step per payment, in `txs`' order.
async fn pay_group(s: &Sides<'_>, txs: &[PayTx]) -> Result<Vec<Step>, PayError> {
    let group = log::new_tx_id();
    log::begin_xa_group(s.log_db, &group, txs).await?;
    fail::fail_point!("xa.after_begin", |_| Err(PayError::Injected(
        "xa.after_begin"
    )));
    let (order, can_go) = OrderGroupBranch::lock(s.db, &group, txs).await?;
    let mut refused: Vec<Option<AbortReason>> = can_go
        .iter()
        .map(|ok| (!ok).then_some(AbortReason::OrderNotPayable))
        .collect();
    let payable: Vec<usize> = (0..txs.len()).filter(|&i| can_go[i]).collect();
    if payable.is_empty() {
        return abort(s, &group, txs, &refused, order, false).await;
    }
    let request = PrepareRequest {
        group_id: group.clone(),
        items: payable.iter().map(|&i| txs[i].wallet_request()).collect(),
    };
    let wallet = s.wallet.xa_prepare(&request).await;
    fail::fail_point!("xa.after_prepare_wallet", |_| Err(PayError::Injected(
        "xa.after_prepare_wallet"
    )));
    let debits = match wallet {
        Ok(Prepared {
            outcome: PrepareOutcome::Prepared,
            debits,
        }) => debits,
        other => {
            let reason = match other {
                Err(e) => wallet_failure(&txs[payable[0]], "group prepare", e),
                _ => AbortReason::WalletUnavailable,
            };
            for &i in &payable {
                refused[i] = Some(reason);
            }
            return abort(s, &group, txs, &refused, order, true).await;
        }
    };
    for (&i, debit) in payable.iter().zip(&debits) {
        refused[i] = match debit {
            Debit::Debited => None,
            Debit::InsufficientFunds => Some(AbortReason::InsufficientFunds),
            Debit::Busy => Some(AbortReason::WalletUnavailable),
        };
    }
    let members: Vec<usize> = payable
        .into_iter()
        .filter(|&i| refused[i].is_none())
        .collect();
    if members.is_empty() {
        return abort(s, &group, txs, &refused, order, true).await;
    }
    let orders: Vec<&str> = members.iter().map(|&i| txs[i].order_id.as_str()).collect();
    let order = order.prepare(&orders).await?;
    fail::fail_point!("xa.after_prepare_order", |_| Err(PayError::Injected(
        "xa.after_prepare_order"
    )));
    decide(s, &group, txs, &refused, order).await
}

/// Logs the refused payments `aborting` and the group's members
/// `committing` (all or none), then runs phase two the way it went.
async fn decide(
    s: &Sides<'_>,
    group: &str,
    txs: &[PayTx],
    refused: &[Option<AbortReason>],
    order: BranchConn,
) -> Result<Vec<Step>, PayError> {
    abort_in_log(s, group, txs, refused).await?;
    let members: Vec<&str> = txs
        .iter()
        .zip(refused)
        .filter(|(_, r)| r.is_none())
        .map(|(t, _)| t.tx_id.as_str())
        .collect();
    if !log::decide_xa_group(s.log_db, group, &members).await? {
        // Recovery decided first (the group outlived its timeout).
        finish_abort(s, group, OrderSide::Prepared(order)).await?;
        let timed_out: Vec<Option<AbortReason>> = refused
            .iter()
            .map(|r| Some(r.unwrap_or(AbortReason::Timeout)))
            .collect();
        return Ok(steps(&timed_out, Step::Aborted(AbortReason::Timeout)));
    }
    fail::fail_point!("xa.after_decide", |_| Err(PayError::Injected(
        "xa.after_decide"
    )));
    let ended = commit(s, group, OrderSide::Prepared(order)).await?;
    Ok(steps(
        refused,
        if ended {
            Step::Committed
        } else {
            Step::Decided
        },
    ))
}

/// Each payment's step: its refusal, or `member` for the group's members.
fn steps(refused: &[Option<AbortReason>], member: Step) -> Vec<Step> {
    refused
        .iter()
        .map(|r| r.map_or(member, Step::Aborted))
        .collect()
}

/// Logs each refused payment of `txs` `aborting`, with its reason (one
/// statement per reason; payments already decided stay as they are).
async fn abort_in_log(
    s: &Sides<'_>,
    group: &str,
    txs: &[PayTx],
    refused: &[Option<AbortReason>],
) -> Result<(), PayError> {
    let mut reasons: Vec<AbortReason> = refused.iter().flatten().copied().collect();
    reasons.sort_by_key(|r| r.as_str());
    reasons.dedup();
    for reason in reasons {
        let ids: Vec<&str> = txs
            .iter()
            .zip(refused)
            .filter(|(_, r)| **r == Some(reason))
            .map(|(t, _)| t.tx_id.as_str())
            .collect();
        log::move_xa_group(
            s.log_db,
            group,
            Some(&ids),
            TxState::Started,
            TxState::Aborting,
            Some(reason),
        )
        .await?;
    }
    Ok(())
}

/// Aborts a group none of whose payments can go on (each has its reason),
/// before its order branch was prepared: ends that branch, logs them
/// `aborting`, then rolls the wallet's branch back. `wallet_asked`:
/// whether the wallet may hold a branch of it.
async fn abort(
    s: &Sides<'_>,
    group: &str,
    txs: &[PayTx],
    refused: &[Option<AbortReason>],
    order: OrderGroupBranch,
    wallet_asked: bool,
) -> Result<Vec<Step>, PayError> {
    order.give_up().await?;
    abort_in_log(s, group, txs, refused).await?;
    fail::fail_point!("xa.after_decide_abort", |_| Err(PayError::Injected(
        "xa.after_decide_abort"
    )));
    if wallet_asked {
        finish_abort(s, group, OrderSide::Ended).await?;
    } else {
        // No branch of the group anywhere: only the log is left.
        log::end_xa_group(s.log_db, group).await?;
    }
    // Every payment here has its own reason.
    Ok(refused
        .iter()
        .map(|r| Step::Aborted(r.unwrap_or(AbortReason::Timeout)))
        .collect())
}

/// Phase two, commit, of a group decided `committing`. True once the log
/// says its payments ended, false when a branch could not be reached yet
/// (recovery commits it later).
pub async fn commit(s: &Sides<'_>, group: &str, order: OrderSide) -> Result<bool, PayError> {
    let wallet_done = match s.wallet.xa_commit(group).await {
        Ok(EndOutcome::Done | EndOutcome::Repeat) => true,
        Ok(other) => return Err(inconsistent(group, "wallet commit", other)),
        Err(WalletCallError::Unavailable(why)) => {
            tracing::warn!(group, %why, "wallet commit unanswered; recovery finishes it");
            false
        }
        Err(e) => return Err(PayError::Wallet(e)),
    };
    fail::fail_point!("xa.after_commit_wallet", |_| Err(PayError::Injected(
        "xa.after_commit_wallet"
    )));
    let order_done = end_order(s, group, order, true).await?;
    fail::fail_point!("xa.after_commit_order", |_| Err(PayError::Injected(
        "xa.after_commit_order"
    )));
    if !(wallet_done && order_done) {
        return Ok(false);
    }
    log::end_xa_group(s.log_db, group).await?;
    Ok(true)
}

/// Phase two, rollback, of a group decided `aborting`; true once the log
/// says its payments ended.
pub async fn finish_abort(s: &Sides<'_>, group: &str, order: OrderSide) -> Result<bool, PayError> {
    let wallet_done = match s.wallet.xa_rollback(group).await {
        Ok(EndOutcome::Done | EndOutcome::EmptyRollback | EndOutcome::Repeat) => true,
        Ok(EndOutcome::Refused) => {
            return Err(inconsistent(group, "wallet rollback", EndOutcome::Refused))
        }
        Err(WalletCallError::Unavailable(why)) => {
            tracing::warn!(group, %why, "wallet rollback unanswered; recovery finishes it");
            false
        }
        Err(e) => return Err(PayError::Wallet(e)),
    };
    fail::fail_point!("xa.after_rollback_wallet", |_| Err(PayError::Injected(
        "xa.after_rollback_wallet"
    )));
    let order_done = end_order(s, group, order, false).await?;
    fail::fail_point!("xa.after_rollback_order", |_| Err(PayError::Injected(
        "xa.after_rollback_order"
    )));
    if !(wallet_done && order_done) {
        return Ok(false);
    }
    log::end_xa_group(s.log_db, group).await?;
    Ok(true)
}

/// Ends the order branch wherever it is; false while another live
/// session still holds it.
async fn end_order(
    s: &Sides<'_>,
    group: &str,
    order: OrderSide,
    commit: bool,
) -> Result<bool, PayError> {
    match order {
        OrderSide::Prepared(branch) if commit => branch.commit().await?,
        OrderSide::Prepared(branch) => branch.rollback().await?,
        OrderSide::Ended => {}
        OrderSide::Elsewhere => return end_order_detached(s, group, commit).await,
    }
    Ok(true)
}

/// Ends the order branch from this session (the one that prepared it is
/// gone); false while another live session still holds it.
async fn end_order_detached(s: &Sides<'_>, group: &str, commit: bool) -> Result<bool, PayError> {
    let xid = Xid::new(group, ORDER)?;
    match xa_branch::end_detached(s.db, &xid, commit).await? {
        Detached::Done => Ok(true),
        Detached::Busy => Ok(false),
        // Ended before, or (rolling back) never prepared. A commit must
        // find every committed payment's order paid, or the branch was lost.
        Detached::Absent if commit => {
            let unpaid: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pay_transactions t JOIN orders o ON o.id = t.order_id \
                 WHERE t.xa_group = ? AND t.state IN (?, ?) AND o.status <> ?",
            )
            .bind(group)
            .bind(TxState::Committing)
            .bind(TxState::Committed)
            .bind(OrderStatus::Paid)
            .fetch_one(s.log_db)
            .await
            .map_err(crate::orders::OrderError::from)?;
            if unpaid > 0 {
                return Err(PayError::Inconsistent(format!(
                    "group {group}: committing an order branch that is gone, \
                     {unpaid} orders not paid"
                )));
            }
            Ok(true)
        }
        Detached::Absent => Ok(true),
    }
}

/// Recovery of the group `group`: a payment still `started` is decided
/// `aborting` (the whole group with it, in one statement: a group whose
/// decision was logged has none left), then the branches end the way the
/// log says. The state the group's members reached, or `None` while a
/// branch could not be reached.
pub async fn recover_group(p: &Payments, group: &str) -> Result<Option<TxState>, PayError> {
    let s = p.xa_sides();
    log::move_xa_group(
        s.log_db,
        group,
        None,
        TxState::Started,
        TxState::Aborting,
        Some(AbortReason::Timeout),
    )
    .await?;
    let members = log::xa_group_members(s.log_db, group).await?;
    let committed = members
        .iter()
        .any(|m| matches!(m.state, TxState::Committing | TxState::Committed));
    let ended = if committed {
        commit(&s, group, OrderSide::Elsewhere).await?
    } else {
        finish_abort(&s, group, OrderSide::Elsewhere).await?
    };
    Ok(ended.then_some(if committed {
        TxState::Committed
    } else {
        TxState::Aborted
    }))
}

/// Ends prepared branches of groups the log has already ended (a prepare
/// that landed after its group was aborted, or a branch whose phase two
/// was lost): how many it ended. Branches of unknown or still-open groups
/// are left alone (the stale-transaction pass owns those; unknown ones
/// belong to someone else on this server).
pub async fn end_orphans(p: &Payments) -> Result<u32, PayError> {
    let s = p.xa_sides();
    let mut conn =
        s.db.acquire()
            .await
            .map_err(crate::orders::OrderError::from)?;
    let order_groups = xa_branch::prepared(&mut conn, ORDER).await?;
    drop(conn);
    let wallet_groups = s.wallet.xa_prepared().await?;
    let mut ended = 0;
    for (groups, is_order) in [(order_groups, true), (wallet_groups, false)] {
        for group in groups {
            let members = log::xa_group_members(s.log_db, &group).await?;
            let open = members.iter().any(|m| {
                matches!(
                    m.state,
                    TxState::Started | TxState::Committing | TxState::Aborting
                )
            });
            if members.is_empty() || open {
                continue;
            }
            let commit = members.iter().any(|m| m.state == TxState::Committed);
            let done = if is_order {
                end_order_detached(&s, &group, commit).await?
            } else if commit {
                s.wallet.xa_commit(&group).await.is_ok()
            } else {
                s.wallet.xa_rollback(&group).await.is_ok()
            };
            if done {
                tracing::warn!(%group, commit, order = is_order, "ended an orphaned XA branch");
                ended += 1;
            }
        }
    }
    Ok(ended)
}

fn inconsistent(group: &str, step: &str, outcome: EndOutcome) -> PayError {
    PayError::Inconsistent(format!("group {group}: {step} answered {outcome:?}"))
}

/// Every fail point of this mode, in the order a group passes them.
pub const FAIL_POINTS: &[&str] = &[
    "xa.after_begin",
    "xa.after_prepare_wallet",
    "xa.after_prepare_order",
    "xa.after_decide",
    "xa.after_commit_wallet",
    "xa.after_commit_order",
    "xa.after_decide_abort",
    "xa.after_rollback_wallet",
    "xa.after_rollback_order",
];
