//! The wallet's branch of XA payments: a group's prepare debits each
//! payment's amount the balance covers (balances and ledger rows) inside
//! one prepared XA branch of the wallet's database, named by the group;
//! phase two commits or rolls it back, the whole group at once.
//!
//! Between the two phases this instance keeps the branch's connection in
//! [`PreparedBranches`], so phase two is one statement on it. It keeps it
//! for at most `wallet.xa_hold_ms`: a coordinator that never comes back
//! (it crashed) must not pin a connection forever, and a branch whose
//! connection is gone can be ended by any instance, which is how recovery
//! reaches it. A crash of this instance lets every branch go the same way:
//! MariaDB keeps prepared branches when their connection drops.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sqlx::MySqlPool;

use super::accounts::WalletError;
use super::routes::TryRequest;
use crate::payments::fence::EndOutcome;
use crate::payments::xa_branch::{self, BranchConn, Detached, XaError, Xid};
use crate::statuses::LedgerKind;

/// This branch's name in the xid.
pub const BRANCH: &str = "wallet";

/// What a group's prepare did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrepareOutcome {
    /// The debits answered `debited` are prepared, waiting for phase two
    /// (none were: no branch is left).
    Prepared,
    /// This group's branch was prepared (or ended) by an earlier call:
    /// what it holds is not known here, so the coordinator aborts.
    Repeat,
}

/// One payment's debit in a group's prepare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Debit {
    /// In the prepared branch.
    Debited,
    /// The balance does not cover it (after the group's earlier debits of
    /// the same wallet): not in the branch.
    InsufficientFunds,
    /// The wallet is held by another group's branch (the same buyer paying
    /// another order at this moment, or a branch in doubt until recovery):
    /// not in the branch; the buyer may retry.
    Busy,
}

/// A group's prepare, answered: one debit per item, in the request's order
/// (empty for a repeat).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepared {
    pub outcome: PrepareOutcome,
    #[serde(default)]
    pub debits: Vec<Debit>,
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

    fn keep(&self, group: &str, branch: BranchConn) {
        if let Ok(mut held) = self.held.lock() {
            held.insert(group.to_string(), (branch, Instant::now()));
        }
        // A poisoned map drops the branch: its connection closes, and the
        // branch waits for any instance, as after a crash.
    }

    fn take(&self, group: &str) -> Option<BranchConn> {
        self.held.lock().ok()?.remove(group).map(|(b, _)| b)
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

/// Prepare: debits each item's amount from its buyer's balance, those the
/// balance covers, inside one branch named (`group`, `wallet`), which this
/// instance then holds for phase two.
pub async fn prepare(
    db: &MySqlPool,
    held: &PreparedBranches,
    group: &str,
    items: &[TryRequest],
) -> Result<Prepared, WalletError> {
    let xid = Xid::new(group, BRANCH).map_err(xa)?;
    let mut branch = match BranchConn::start(db, xid).await {
        Ok(b) => b,
        Err(XaError::Duplicate(_)) => {
            return Ok(Prepared {
                outcome: PrepareOutcome::Repeat,
                debits: Vec::new(),
            })
        }
        Err(e) => return Err(xa(e)),
    };
    let debits = debit_group(branch.conn(), group, items).await?;
    if debits.contains(&Debit::Debited) {
        branch.prepare().await.map_err(xa)?;
        held.keep(group, branch);
    } else {
        branch.rollback_active().await.map_err(xa)?;
    }
    Ok(Prepared {
        outcome: PrepareOutcome::Prepared,
        debits,
    })
}

/// The group's debits, inside the caller's branch: locks the buyers'
/// wallets (in user order, skipping those another branch holds), takes
/// each item the balance still covers, then
/// writes the new balances in one statement and the ledger rows (naming
/// the group) in another. Every statement goes by primary key (`FORCE
/// INDEX`): on a small table the optimizer would scan it, locking every
/// row, and two groups would deadlock.
async fn debit_group(
    conn: &mut sqlx::MySqlConnection,
    group: &str,
    items: &[TryRequest],
) -> Result<Vec<Debit>, WalletError> {
    let users: BTreeSet<u64> = items.iter().map(|i| i.user_id).collect();
    let sql = format!(
        "SELECT user_id, balance_cents, frozen_cents FROM wallets FORCE INDEX (PRIMARY) \
         WHERE user_id IN ({}) ORDER BY user_id FOR UPDATE SKIP LOCKED",
        vec!["?"; users.len()].join(", ")
    );
    let mut query = sqlx::query_as::<_, (u64, i64, i64)>(&sql);
    for u in &users {
        query = query.bind(*u);
    }
    let mut wallets: HashMap<u64, (i64, i64)> = query
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|(user, balance, frozen)| (user, (balance, frozen)))
        .collect();
    let missing: Vec<u64> = users
        .into_iter()
        .filter(|u| !wallets.contains_key(u))
        .collect();
    let locked_elsewhere = existing(conn, &missing).await?;
    let mut ledger = Vec::new();
    let debits = items
        .iter()
        .map(|item| match wallets.get_mut(&item.user_id) {
            Some((balance, frozen)) if item.amount_cents > 0 && *balance >= item.amount_cents => {
                *balance -= item.amount_cents;
                ledger.push((item, *balance, *frozen));
                Debit::Debited
            }
            Some(_) => Debit::InsufficientFunds,
            // Skipped by the locking read: held by another branch, or no
            // wallet at all (no money).
            None if locked_elsewhere.contains(&item.user_id) => Debit::Busy,
            None => Debit::InsufficientFunds,
        })
        .collect();
    if ledger.is_empty() {
        return Ok(debits);
    }
    // Each wallet's last ledger row holds its balance after the group.
    let debited: BTreeMap<u64, i64> = ledger
        .iter()
        .map(|(item, balance, _)| (item.user_id, *balance))
        .collect();
    set_balances(conn, &debited).await?;
    write_ledger(conn, group, &ledger).await?;
    Ok(debits)
}

/// Which of `users` have a wallet (a plain read, which no lock stops):
/// those the locking read skipped are held by another branch.
async fn existing(
    conn: &mut sqlx::MySqlConnection,
    users: &[u64],
) -> Result<HashSet<u64>, WalletError> {
    if users.is_empty() {
        return Ok(HashSet::new());
    }
    let sql = format!(
        "SELECT user_id FROM wallets WHERE user_id IN ({})",
        vec!["?"; users.len()].join(", ")
    );
    let mut query = sqlx::query_scalar::<_, u64>(&sql);
    for u in users {
        query = query.bind(*u);
    }
    Ok(query.fetch_all(&mut *conn).await?.into_iter().collect())
}

/// Sets each wallet's balance (rows the caller locked and computed).
async fn set_balances(
    conn: &mut sqlx::MySqlConnection,
    balances: &BTreeMap<u64, i64>,
) -> Result<(), WalletError> {
    let sql = format!(
        "UPDATE wallets FORCE INDEX (PRIMARY) SET balance_cents = CASE user_id {} END \
         WHERE user_id IN ({})",
        vec!["WHEN ? THEN ?"; balances.len()].join(" "),
        vec!["?"; balances.len()].join(", ")
    );
    let mut query = sqlx::query(&sql);
    for (user, balance) in balances {
        query = query.bind(*user).bind(*balance);
    }
    for user in balances.keys() {
        query = query.bind(*user);
    }
    let changed = query.execute(&mut *conn).await?.rows_affected();
    if changed != balances.len() as u64 {
        return Err(WalletError::Xa(format!(
            "{changed} of {} locked wallets debited",
            balances.len()
        )));
    }
    Ok(())
}

/// One `debit` ledger row per item, with the balances after it.
async fn write_ledger(
    conn: &mut sqlx::MySqlConnection,
    group: &str,
    rows: &[(&TryRequest, i64, i64)],
) -> Result<(), WalletError> {
    let sql = format!(
        "INSERT INTO wallet_ledger \
         (user_id, kind, amount_cents, balance_after, frozen_after, order_id, tx_id, xa_group) \
         VALUES {}",
        vec!["(?, ?, ?, ?, ?, ?, ?, ?)"; rows.len()].join(", ")
    );
    let mut query = sqlx::query(&sql);
    for (item, balance, frozen) in rows {
        query = query
            .bind(item.user_id)
            .bind(LedgerKind::Debit)
            .bind(item.amount_cents)
            .bind(*balance)
            .bind(*frozen)
            .bind(&item.order_id)
            .bind(&item.tx_id)
            .bind(group);
    }
    query.execute(&mut *conn).await?;
    Ok(())
}

/// Phase two: commit (`commit = true`) or roll back the branch of
/// `group`. `None` when another instance still holds it (retry later).
pub async fn end(
    db: &MySqlPool,
    held: &PreparedBranches,
    group: &str,
    commit: bool,
) -> Result<Option<EndOutcome>, WalletError> {
    let xid = Xid::new(group, BRANCH).map_err(xa)?;
    if let Some(branch) = held.take(group) {
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
                let debited = debited(db, group).await?;
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

/// Whether the branch `group` committed: its debits are in the ledger
/// (one written before groups names its branch by its own `tx_id`).
async fn debited(db: &MySqlPool, group: &str) -> Result<bool, WalletError> {
    let n: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM wallet_ledger WHERE xa_group = ?) \
              + (SELECT COUNT(*) FROM wallet_ledger WHERE tx_id = ? AND kind = ?)",
    )
    .bind(group)
    .bind(group)
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
