//! The wallet's branch of an XA payment: prepare debits the order's amount
//! (balance and ledger row) inside a prepared XA branch of the wallet's
//! database; phase two commits or rolls it back.
//!
//! Between the two phases this instance keeps the branch's connection in
//! [`PreparedBranches`], so phase two is one statement on it. It keeps it
//! for at most `wallet.xa_hold_ms`: a coordinator that never comes back
//! (it crashed) must not pin a connection forever, and a branch whose
//! connection is gone can be ended by any instance, which is how recovery
//! reaches it. A crash of this instance lets every branch go the same way:
//! MariaDB keeps prepared branches when their connection drops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sqlx::MySqlPool;

use super::accounts::{self, Movement, WalletError};
use crate::payments::fence::EndOutcome;
use crate::payments::xa_branch::{self, BranchConn, Detached, XaError, Xid};
use crate::statuses::LedgerKind;

/// This branch's name in the xid.
pub const BRANCH: &str = "wallet";

/// What a prepare did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrepareOutcome {
    /// The debit is prepared, waiting for phase two.
    Prepared,
    /// Prepared (or committed) by an earlier call for this transaction.
    Repeat,
    /// The balance does not cover the amount: nothing prepared.
    InsufficientFunds,
}

/// Prepared branches this instance still holds the connection of.
pub struct PreparedBranches {
    held: Mutex<HashMap<String, (BranchConn, Instant)>>,
    hold: Duration,
}

impl PreparedBranches {
    /// An empty set whose branches are let go after `hold`, by a task that
    /// lives as long as the set.
    pub fn new(hold: Duration) -> Arc<PreparedBranches> {
        let set = Arc::new(PreparedBranches {
            held: Mutex::new(HashMap::new()),
            hold,
        });
        spawn_release(Arc::downgrade(&set));
        set
    }

    fn keep(&self, tx_id: &str, branch: BranchConn) {
        if let Ok(mut held) = self.held.lock() {
            held.insert(tx_id.to_string(), (branch, Instant::now()));
        }
        // A poisoned map drops the branch: its connection closes, and the
        // branch waits for any instance, as after a crash.
    }

    fn take(&self, tx_id: &str) -> Option<BranchConn> {
        self.held.lock().ok()?.remove(tx_id).map(|(b, _)| b)
    }

    /// Lets go of the branches held longer than the hold time; how many.
    fn release_expired(&self) -> usize {
        let Ok(mut held) = self.held.lock() else {
            return 0;
        };
        let before = held.len();
        held.retain(|_, (_, since)| since.elapsed() < self.hold);
        before - held.len()
    }

    /// How many branches this instance holds now.
    pub fn len(&self) -> usize {
        self.held.lock().map(|h| h.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn spawn_release(set: Weak<PreparedBranches>) {
    tokio::spawn(async move {
        loop {
            let period = match set.upgrade() {
                Some(s) => s.hold / 2,
                None => return,
            };
            tokio::time::sleep(period.max(Duration::from_millis(10))).await;
            let Some(s) = set.upgrade() else { return };
            let released = s.release_expired();
            if released > 0 {
                tracing::warn!(
                    released,
                    "prepared XA branches let go: their coordinator did not end them in time"
                );
            }
        }
    });
}

/// Prepare: debit `amount_cents` of `user_id`'s balance for `order_id`,
/// prepared as the branch (`tx_id`, `wallet`).
pub async fn prepare(
    db: &MySqlPool,
    held: &PreparedBranches,
    tx_id: &str,
    user_id: u64,
    order_id: &str,
    amount_cents: i64,
) -> Result<PrepareOutcome, WalletError> {
    let xid = Xid::new(tx_id, BRANCH).map_err(xa)?;
    let mut branch = match BranchConn::start(db, xid).await {
        Ok(b) => b,
        Err(XaError::Duplicate(_)) => return Ok(PrepareOutcome::Repeat),
        Err(e) => return Err(xa(e)),
    };
    let debit = Movement {
        user_id,
        kind: LedgerKind::Debit,
        amount_cents,
        order_id: Some(order_id),
        tx_id: Some(tx_id),
    };
    let outcome = match accounts::apply(branch.conn(), &debit, false).await {
        Ok(true) => PrepareOutcome::Prepared,
        Ok(false) => PrepareOutcome::InsufficientFunds,
        // This transaction's debit is in the ledger: committed before.
        Err(WalletError::Db(e)) if accounts::is_duplicate_key(&e) => PrepareOutcome::Repeat,
        Err(e) => return Err(e),
    };
    if outcome != PrepareOutcome::Prepared {
        branch.rollback_active().await.map_err(xa)?;
        return Ok(outcome);
    }
    branch.prepare().await.map_err(xa)?;
    held.keep(tx_id, branch);
    Ok(PrepareOutcome::Prepared)
}

/// Phase two: commit (`commit = true`) or roll back the branch of
/// `tx_id`. `None` when another instance still holds it (retry later).
pub async fn end(
    db: &MySqlPool,
    held: &PreparedBranches,
    tx_id: &str,
    commit: bool,
) -> Result<Option<EndOutcome>, WalletError> {
    let xid = Xid::new(tx_id, BRANCH).map_err(xa)?;
    if let Some(branch) = held.take(tx_id) {
        if commit {
            branch.commit().await.map_err(xa)?;
        } else {
            branch.rollback().await.map_err(xa)?;
        }
        return Ok(Some(EndOutcome::Done));
    }
    Ok(Some(
        match xa_branch::end_detached(db, &xid, commit)
            .await
            .map_err(xa)?
        {
            Detached::Done => EndOutcome::Done,
            Detached::Busy => return Ok(None),
            Detached::Absent => {
                // Ended before, or never prepared: the ledger tells which.
                let debited = debited(db, tx_id).await?;
                match (commit, debited) {
                    (true, true) => EndOutcome::Repeat,
                    (false, false) => EndOutcome::EmptyRollback,
                    // Decided the other way before (or the prepare never
                    // happened, yet the coordinator committed).
                    _ => EndOutcome::Refused,
                }
            }
        },
    ))
}

/// Transaction ids of the wallet branches prepared and not ended on this
/// database server (every deployment's: the coordinator keeps its own).
pub async fn prepared(db: &MySqlPool) -> Result<Vec<String>, WalletError> {
    let mut conn = db.acquire().await?;
    xa_branch::prepared(&mut conn, BRANCH).await.map_err(xa)
}

async fn debited(db: &MySqlPool, tx_id: &str) -> Result<bool, WalletError> {
    let n: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM wallet_ledger WHERE tx_id = ? AND kind = ?")
            .bind(tx_id)
            .bind(LedgerKind::Debit)
            .fetch_one(db)
            .await?;
    Ok(n > 0)
}

fn xa(e: XaError) -> WalletError {
    match e {
        XaError::Db(e) => WalletError::Db(e),
        other => WalletError::Xa(other.to_string()),
    }
}
