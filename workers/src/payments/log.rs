//! The coordinator's log (`pay_transactions`, in the order database): one
//! row per payment attempt, written before any branch is touched, so that
//! after any crash recovery finds every transaction that may hold money or
//! an order. Its state only moves forward, each step a guarded `UPDATE`
//! (the one that changed the row decided):
//!
//! ```text
//!   started ──▶ committing ──▶ committed
//!      └──────▶ aborting ────▶ aborted
//! ```

use sqlx::{MySqlPool, Row};

use crate::group_commit::{self, GroupCommit, GroupLimits};
use crate::orders::retry_on_deadlock;
use crate::statuses::{AbortReason, TxState, UnknownValue};
use seckill_contracts::config::PaymentMode;

/// Why the log could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("MySQL: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored value: {0}")]
    Stored(#[from] UnknownValue),
}

/// One payment transaction, as the log holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayTx {
    pub tx_id: String,
    pub order_id: String,
    pub user_id: u64,
    /// The order's sale (every order step locks its row first).
    pub sale_id: u64,
    pub amount_cents: i64,
    /// The mode it runs in (recovery ends it in that mode, whatever the
    /// deployment's mode is now).
    pub mode: PaymentMode,
    pub state: TxState,
    /// `xa` mode: the group whose XA branches carry this payment (their
    /// gtrid); `None` in the other modes.
    pub xa_group: Option<String>,
}

impl PayTx {
    /// The wallet branch's first call (a Try, a prepare, a debit): the
    /// buyer's money for this order in this transaction.
    pub fn wallet_request(&self) -> crate::wallet::routes::TryRequest {
        crate::wallet::routes::TryRequest {
            tx_id: self.tx_id.clone(),
            user_id: self.user_id,
            order_id: self.order_id.clone(),
            amount_cents: self.amount_cents,
        }
    }
}

/// A fresh transaction id: 128 random bits, hex.
pub fn new_tx_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Whether `id` has the shape of a transaction id (what the wallet takes).
pub fn valid_tx_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The log's guarded moves (`UPDATE … WHERE state = from`: the call that
/// changed the row decided), run for many payments at once: the moves of
/// concurrent payments (a decision, a last move) share one call of the
/// `log_move_set` procedure, one transaction and one commit
/// ([`crate::group_commit`]): one `UPDATE` for the group when every move
/// finds its row where expected, else each the guarded `UPDATE` it was
/// alone (`log_move_group`).
pub struct LogMoves(GroupCommit<LogMove, bool, LogError>);

impl LogMoves {
    /// Starts the runners on the current runtime.
    pub fn start(db: &MySqlPool, limits: GroupLimits) -> LogMoves {
        LogMoves(GroupCommit::start(
            limits,
            group_commit::on_pool(db, move_group),
        ))
    }

    /// Moves `tx_id` from `from` to `to` (with `reason`, when given); true
    /// when this call did (false: the transaction was elsewhere, someone
    /// else moved it).
    pub async fn advance(
        &self,
        tx_id: &str,
        from: TxState,
        to: TxState,
        reason: Option<AbortReason>,
    ) -> Result<bool, LogError> {
        let item = LogMove {
            tx_id: tx_id.to_string(),
            from,
            to,
            reason,
        };
        self.0.run(item).await
    }
}

/// One move of a group; by transaction, the row it locks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct LogMove {
    tx_id: String,
    from: TxState,
    to: TxState,
    reason: Option<AbortReason>,
}

async fn move_group(
    db: MySqlPool,
    items: Vec<LogMove>,
) -> Result<Vec<Result<bool, LogError>>, LogError> {
    let args: Vec<serde_json::Value> = items
        .iter()
        .map(|m| {
            let reason = m.reason.map_or("", AbortReason::as_str);
            serde_json::json!([m.tx_id, m.from.as_str(), m.to.as_str(), reason])
        })
        .collect();
    let outcomes = group_commit::call_procedure(&db, "CALL log_move_set(?)", &args, &[]).await?;
    Ok(outcomes
        .into_iter()
        .map(|o| match o.as_deref() {
            Some("moved") => Ok(true),
            Some("stayed") => Ok(false),
            other => Err(LogError::Stored(UnknownValue {
                kind: "log_move_group outcome",
                value: other.unwrap_or("NULL").to_string(),
            })),
        })
        .collect())
}

/// XA: logs a group's payments as `started`, each naming `group` (the
/// gtrid of the branches that will carry them), in one multi-row `INSERT`
/// and one commit, before any branch starts.
pub async fn begin_xa_group(db: &MySqlPool, group: &str, txs: &[PayTx]) -> Result<(), LogError> {
    let sql = format!(
        "INSERT INTO pay_transactions \
         (tx_id, order_id, user_id, amount_cents, mode, xa_group, state) VALUES {}",
        vec!["(?, ?, ?, ?, ?, ?, ?)"; txs.len()].join(", ")
    );
    retry_on_deadlock(|| {
        let mut query = sqlx::query(&sql);
        for tx in txs {
            query = query
                .bind(&tx.tx_id)
                .bind(&tx.order_id)
                .bind(tx.user_id)
                .bind(tx.amount_cents)
                .bind(tx.mode.as_str())
                .bind(group)
                .bind(TxState::Started);
        }
        query.execute(db)
    })
    .await?;
    Ok(())
}

/// XA: decides `committing` for `members` of `group` (the payments its
/// branches carry), all or none: false when any of them had left
/// `started` (recovery decided it `aborting`), and then nothing moved.
/// One transaction, so the group's branches have one decision.
pub async fn decide_xa_group(
    db: &MySqlPool,
    group: &str,
    members: &[&str],
) -> Result<bool, LogError> {
    let sql = format!(
        "UPDATE pay_transactions SET state = ? \
         WHERE xa_group = ? AND state = ? AND tx_id IN ({})",
        vec!["?"; members.len()].join(", ")
    );
    retry_on_deadlock(|| async {
        let mut t = db.begin().await?;
        let mut query = sqlx::query(&sql)
            .bind(TxState::Committing)
            .bind(group)
            .bind(TxState::Started);
        for m in members {
            query = query.bind(*m);
        }
        let moved = query.execute(&mut *t).await?.rows_affected();
        if moved == members.len() as u64 {
            t.commit().await?;
            Ok::<bool, sqlx::Error>(true)
        } else {
            t.rollback().await?;
            Ok(false)
        }
    })
    .await
    .map_err(LogError::from)
}

/// XA: moves the members of `group` that are `from` to `to` (with
/// `reason`, when given), limited to `only` when it is given; how many
/// moved. Recovery's decision for a group is such a move (`started` →
/// `aborting`), as is every group's last move.
pub async fn move_xa_group(
    db: &MySqlPool,
    group: &str,
    only: Option<&[&str]>,
    from: TxState,
    to: TxState,
    reason: Option<AbortReason>,
) -> Result<u64, LogError> {
    let mut sql = String::from(
        "UPDATE pay_transactions SET state = ?, reason = COALESCE(?, reason) \
         WHERE xa_group = ? AND state = ?",
    );
    if let Some(only) = only {
        if only.is_empty() {
            return Ok(0);
        }
        sql.push_str(&format!(
            " AND tx_id IN ({})",
            vec!["?"; only.len()].join(", ")
        ));
    }
    let moved = retry_on_deadlock(|| {
        let mut query = sqlx::query(&sql)
            .bind(to)
            .bind(reason.map(AbortReason::as_str))
            .bind(group)
            .bind(from);
        for m in only.unwrap_or_default() {
            query = query.bind(*m);
        }
        query.execute(db)
    })
    .await?
    .rows_affected();
    Ok(moved)
}

/// XA: the last move of a group's decided payments (`committing` →
/// `committed`, `aborting` → `aborted`), once its branches ended.
pub async fn end_xa_group(db: &MySqlPool, group: &str) -> Result<(), LogError> {
    retry_on_deadlock(|| {
        sqlx::query(
            "UPDATE pay_transactions \
             SET state = IF(state = ?, ?, ?) WHERE xa_group = ? AND state IN (?, ?)",
        )
        .bind(TxState::Committing)
        .bind(TxState::Committed)
        .bind(TxState::Aborted)
        .bind(group)
        .bind(TxState::Committing)
        .bind(TxState::Aborting)
        .execute(db)
    })
    .await?;
    Ok(())
}

/// XA: whether `group` names branches of this deployment's payments.
pub async fn xa_group_known(db: &MySqlPool, group: &str) -> Result<bool, LogError> {
    let known: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM pay_transactions WHERE xa_group = ? LIMIT 1")
            .bind(group)
            .fetch_optional(db)
            .await?;
    Ok(known.is_some())
}

/// XA: every payment of `group`, as the log holds it (none: not a group
/// of this deployment's).
pub async fn xa_group_members(db: &MySqlPool, group: &str) -> Result<Vec<PayTx>, LogError> {
    let sql = format!(
        "SELECT {TX_COLUMNS} FROM pay_transactions t JOIN orders o ON o.id = t.order_id \
         WHERE t.xa_group = ? ORDER BY t.tx_id"
    );
    let rows = sqlx::query(&sql).bind(group).fetch_all(db).await?;
    rows.iter().map(from_row).collect()
}

const TX_COLUMNS: &str =
    "t.tx_id, t.order_id, t.user_id, o.sale_id, t.amount_cents, CAST(t.mode AS CHAR) AS mode, \
     t.state, t.xa_group";

/// The transaction `tx_id`, if logged.
pub async fn get(db: &MySqlPool, tx_id: &str) -> Result<Option<PayTx>, LogError> {
    let sql = format!(
        "SELECT {TX_COLUMNS} FROM pay_transactions t JOIN orders o ON o.id = t.order_id \
         WHERE t.tx_id = ?"
    );
    let row = sqlx::query(&sql).bind(tx_id).fetch_optional(db).await?;
    row.map(|r| from_row(&r)).transpose()
}

/// Unfinished transactions last moved more than `older_than_ms` ago,
/// oldest first: what recovery drives to an end.
pub async fn stale(db: &MySqlPool, older_than_ms: u64, limit: u32) -> Result<Vec<PayTx>, LogError> {
    let sql = format!(
        "SELECT {TX_COLUMNS} FROM pay_transactions t JOIN orders o ON o.id = t.order_id \
         WHERE t.state IN (?, ?, ?) AND t.updated_at <= NOW(3) - INTERVAL ? MICROSECOND \
         ORDER BY t.updated_at LIMIT ?"
    );
    let rows = sqlx::query(&sql)
        .bind(TxState::Started)
        .bind(TxState::Committing)
        .bind(TxState::Aborting)
        .bind(older_than_ms.saturating_mul(1_000))
        .bind(limit)
        .fetch_all(db)
        .await?;
    rows.iter().map(from_row).collect()
}

/// What changes whenever a payment starts or moves: (transactions,
/// the latest move). Equal before and after a read of both databases, it
/// proves no payment ran in between.
pub async fn fingerprint(db: &MySqlPool) -> Result<(i64, Option<String>), LogError> {
    let row: (i64, Option<String>) =
        sqlx::query_as("SELECT COUNT(*), CAST(MAX(updated_at) AS CHAR) FROM pay_transactions")
            .fetch_one(db)
            .await?;
    Ok(row)
}

/// How many transactions are not finished (any age).
pub async fn open_count(db: &MySqlPool) -> Result<i64, LogError> {
    let n: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM pay_transactions WHERE state IN (?, ?, ?)")
            .bind(TxState::Started)
            .bind(TxState::Committing)
            .bind(TxState::Aborting)
            .fetch_one(db)
            .await?;
    Ok(n)
}

fn from_row(row: &sqlx::mysql::MySqlRow) -> Result<PayTx, LogError> {
    let state: String = row.try_get("state")?;
    let mode: String = row.try_get("mode")?;
    Ok(PayTx {
        tx_id: row.try_get("tx_id")?,
        order_id: row.try_get("order_id")?,
        user_id: row.try_get("user_id")?,
        sale_id: row.try_get("sale_id")?,
        amount_cents: row.try_get("amount_cents")?,
        mode: mode.parse().map_err(|_| UnknownValue {
            kind: "payment mode",
            value: mode.clone(),
        })?,
        state: state.parse()?,
        xa_group: row.try_get("xa_group")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_ids_are_32_hex_digits() {
        let id = new_tx_id();
        assert!(valid_tx_id(&id), "{id}");
        assert_ne!(id, new_tx_id());
        assert!(!valid_tx_id("' OR 1=1 --'"));
        assert!(!valid_tx_id(&"g".repeat(32)));
        assert!(!valid_tx_id(&"a".repeat(31)));
    }
}
