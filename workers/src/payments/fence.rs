//! The TCC fence: what makes a branch's Try, Confirm and Cancel safe to
//! call in any order, any number of times. Each participant keeps it in
//! its own database (`tcc_fences`, one row per transaction and branch,
//! holding the phase the branch reached), and every step runs inside the
//! participant's own local transaction, together with the business change
//! it guards:
//!
//! ```text
//!   try      no row          → insert `try`, hold the resource   (Fresh)
//!            `try`/`confirm` → nothing, already done            (Repeat)
//!            `cancel`        → refused: the Cancel came first   (Suspended)
//!   confirm  `try`           → apply, phase `confirm`           (Apply)
//!            `confirm`       → nothing                          (Repeat)
//!            no row/`cancel` → refused (the coordinator never asks this)
//!   cancel   no row          → insert `cancel`, empty rollback  (Empty)
//!            `try`           → undo, phase `cancel`             (Undo)
//!            `cancel`        → nothing                          (Repeat)
//!            `confirm`       → refused (decided the other way)
//! ```
//!
//! Concurrent steps of one branch serialize on the row: the first step
//! inserts it (`INSERT IGNORE`: the loser of a race sees the winner's row
//! once it commits), every step then reads it `FOR UPDATE`.

use serde::{Deserialize, Serialize};
use sqlx::{MySqlConnection, Row};

use crate::statuses::{FencePhase, UnknownValue};

/// Why a fence step failed (as opposed to what it decided).
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("MySQL: {0}")]
    Db(#[from] sqlx::Error),
    #[error("fence row: {0}")]
    Stored(#[from] UnknownValue),
}

/// What the Try held, as the fence recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The branch's resource (the user id of a wallet, an order id).
    pub resource: String,
    pub amount_cents: i64,
    /// The order it is held for (`None` on fences written before the
    /// column existed).
    pub order_id: Option<String>,
}

/// What a Try may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TryStart {
    /// First Try: the caller holds the resource in this same transaction.
    Fresh,
    /// Tried (or confirmed) before: nothing to do, answer as before.
    Repeat,
    /// Cancelled before it arrived: refuse, or the hold would never end.
    Suspended,
}

/// What a Confirm may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfirmStart {
    /// Apply the held change, then [`finish`] with `Confirm`.
    Apply(Held),
    Repeat,
    /// No Try to confirm.
    NotTried,
    /// Cancelled: the coordinator decided the other way.
    Cancelled,
}

/// What a Cancel may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelStart {
    /// Undo the held change, then [`finish`] with `Cancel`.
    Undo(Held),
    /// No Try came before: recorded, nothing to undo.
    Empty,
    Repeat,
    /// Confirmed: the coordinator decided the other way.
    Confirmed,
}

/// What a branch's Confirm or Cancel did, as every participant answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndOutcome {
    /// This call moved what the Try held (spent it, or gave it back).
    Done,
    /// A Cancel that came before any Try: recorded, nothing to give back.
    EmptyRollback,
    /// Done before.
    Repeat,
    /// The transaction went the other way (a Confirm after a Cancel, a
    /// Cancel after a Confirm, a Confirm without a Try): nothing moved.
    Refused,
}

/// Starts a Try of `branch` in `tx_id`, holding `held` (inside the
/// caller's transaction).
pub async fn begin_try(
    conn: &mut MySqlConnection,
    tx_id: &str,
    branch: &str,
    held: &Held,
) -> Result<TryStart, FenceError> {
    let inserted = sqlx::query(
        "INSERT IGNORE INTO tcc_fences (tx_id, branch, phase, resource, amount_cents, order_id) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(tx_id)
    .bind(branch)
    .bind(FencePhase::Try)
    .bind(&held.resource)
    .bind(held.amount_cents)
    .bind(&held.order_id)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok(TryStart::Fresh);
    }
    Ok(match locked_phase(conn, tx_id, branch).await? {
        Some((FencePhase::Cancel, _)) => TryStart::Suspended,
        _ => TryStart::Repeat,
    })
}

/// Starts a Confirm of `branch` in `tx_id`.
pub async fn begin_confirm(
    conn: &mut MySqlConnection,
    tx_id: &str,
    branch: &str,
) -> Result<ConfirmStart, FenceError> {
    Ok(match locked_phase(conn, tx_id, branch).await? {
        None => ConfirmStart::NotTried,
        Some((FencePhase::Try, held)) => ConfirmStart::Apply(held),
        Some((FencePhase::Confirm, _)) => ConfirmStart::Repeat,
        Some((FencePhase::Cancel, _)) => ConfirmStart::Cancelled,
    })
}

/// Starts a Cancel of `branch` in `tx_id`.
pub async fn begin_cancel(
    conn: &mut MySqlConnection,
    tx_id: &str,
    branch: &str,
) -> Result<CancelStart, FenceError> {
    let inserted = sqlx::query(
        "INSERT IGNORE INTO tcc_fences (tx_id, branch, phase, empty_rollback) \
         VALUES (?, ?, ?, 1)",
    )
    .bind(tx_id)
    .bind(branch)
    .bind(FencePhase::Cancel)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok(CancelStart::Empty);
    }
    Ok(match locked_phase(conn, tx_id, branch).await? {
        Some((FencePhase::Try, held)) => CancelStart::Undo(held),
        Some((FencePhase::Confirm, _)) => CancelStart::Confirmed,
        // The row exists (the insert lost), so `None` cannot happen; a
        // Cancel of a branch nobody knows is a Cancel already recorded.
        Some((FencePhase::Cancel, _)) | None => CancelStart::Repeat,
    })
}

/// Records the phase the branch reached (after `Apply` or `Undo`).
pub async fn finish(
    conn: &mut MySqlConnection,
    tx_id: &str,
    branch: &str,
    phase: FencePhase,
) -> Result<(), FenceError> {
    sqlx::query("UPDATE tcc_fences SET phase = ? WHERE tx_id = ? AND branch = ?")
        .bind(phase)
        .bind(tx_id)
        .bind(branch)
        .execute(conn)
        .await?;
    Ok(())
}

/// Branches still at `try` for longer than `older_than_ms`: each one is
/// money or an order held by a transaction nobody finished.
pub async fn open_branches(
    conn: &mut MySqlConnection,
    older_than_ms: u64,
) -> Result<i64, FenceError> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM tcc_fences \
         WHERE phase = ? AND updated_at <= NOW(3) - INTERVAL ? MICROSECOND",
    )
    .bind(FencePhase::Try)
    .bind(older_than_ms.saturating_mul(1_000))
    .fetch_one(conn)
    .await?;
    Ok(n)
}

async fn locked_phase(
    conn: &mut MySqlConnection,
    tx_id: &str,
    branch: &str,
) -> Result<Option<(FencePhase, Held)>, FenceError> {
    let row = sqlx::query(
        "SELECT phase, resource, amount_cents, order_id FROM tcc_fences \
         WHERE tx_id = ? AND branch = ? FOR UPDATE",
    )
    .bind(tx_id)
    .bind(branch)
    .fetch_optional(conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let phase: String = row.try_get("phase")?;
    Ok(Some((
        phase.parse()?,
        Held {
            resource: row.try_get("resource")?,
            amount_cents: row.try_get("amount_cents")?,
            order_id: row.try_get("order_id")?,
        },
    )))
}
