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
//!
//! The table is implemented once, as stored procedures
//! (`migrations/*_fence_procedures.sql`, the same file in both databases),
//! so that a branch's whole step (fence, business change, commit) is one
//! procedure call: one round trip where it took five or six. The steps
//! call them inside the database; the functions here call them for a
//! caller that runs its own transaction (the message mode).

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
    /// No Try to confirm, or cancelled: the coordinator decided the
    /// other way.
    Refused,
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

impl EndOutcome {
    /// A step procedure's `outcome` column (`done`, `empty_rollback`,
    /// `repeat`, `refused`).
    pub fn from_procedure(
        procedure: &'static str,
        outcome: Option<&str>,
    ) -> Result<EndOutcome, FenceError> {
        Ok(match outcome {
            Some("done") => EndOutcome::Done,
            Some("empty_rollback") => EndOutcome::EmptyRollback,
            Some("repeat") => EndOutcome::Repeat,
            Some("refused") => EndOutcome::Refused,
            other => return Err(unexpected(procedure, other)),
        })
    }
}

/// Starts a Try of `branch` in `tx_id`, holding `held` (inside the
/// caller's transaction).
pub async fn begin_try(
    conn: &mut MySqlConnection,
    tx_id: &str,
    branch: &str,
    held: &Held,
) -> Result<TryStart, FenceError> {
    let start: Option<String> = sqlx::query_scalar("CALL fence_try_row(?, ?, ?, ?, ?)")
        .bind(tx_id)
        .bind(branch)
        .bind(&held.resource)
        .bind(held.amount_cents)
        .bind(&held.order_id)
        .fetch_one(&mut *conn)
        .await?;
    Ok(match start.as_deref() {
        Some("fresh") => TryStart::Fresh,
        Some("suspended") => TryStart::Suspended,
        Some("repeat") => TryStart::Repeat,
        other => return Err(unexpected("fence_try outcome", other)),
    })
}

/// Starts a Confirm of `branch` in `tx_id`.
pub async fn begin_confirm(
    conn: &mut MySqlConnection,
    tx_id: &str,
    branch: &str,
) -> Result<ConfirmStart, FenceError> {
    let (start, held) = begin_end(conn, tx_id, branch, FencePhase::Confirm).await?;
    Ok(match (start.as_str(), held) {
        ("apply", Some(held)) => ConfirmStart::Apply(held),
        ("repeat", _) => ConfirmStart::Repeat,
        ("refused", _) => ConfirmStart::Refused,
        (other, _) => return Err(unexpected("fence_end outcome", Some(other))),
    })
}

/// Starts a Cancel of `branch` in `tx_id`.
pub async fn begin_cancel(
    conn: &mut MySqlConnection,
    tx_id: &str,
    branch: &str,
) -> Result<CancelStart, FenceError> {
    let (start, held) = begin_end(conn, tx_id, branch, FencePhase::Cancel).await?;
    Ok(match (start.as_str(), held) {
        ("apply", Some(held)) => CancelStart::Undo(held),
        ("empty_rollback", _) => CancelStart::Empty,
        ("repeat", _) => CancelStart::Repeat,
        ("refused", _) => CancelStart::Confirmed,
        (other, _) => return Err(unexpected("fence_end outcome", Some(other))),
    })
}

/// Records the phase the branch reached (after `Apply` or `Undo`).
pub async fn finish(
    conn: &mut MySqlConnection,
    tx_id: &str,
    branch: &str,
    phase: FencePhase,
) -> Result<(), FenceError> {
    sqlx::query("CALL fence_finish(?, ?, ?)")
        .bind(tx_id)
        .bind(branch)
        .bind(phase)
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

/// `fence_end`'s answer, with what the Try held when there is one.
async fn begin_end(
    conn: &mut MySqlConnection,
    tx_id: &str,
    branch: &str,
    phase: FencePhase,
) -> Result<(String, Option<Held>), FenceError> {
    let row = sqlx::query("CALL fence_end_row(?, ?, ?)")
        .bind(tx_id)
        .bind(branch)
        .bind(phase)
        .fetch_one(conn)
        .await?;
    // By position: sqlx names a row's columns from the prepared
    // statement, and a prepared CALL announces none.
    let start: Option<String> = row.try_get(0)?;
    let resource: Option<String> = row.try_get(1)?;
    let held = match (resource, row.try_get::<Option<i64>, _>(2)?) {
        (Some(resource), Some(amount_cents)) => Some(Held {
            resource,
            amount_cents,
            order_id: row.try_get(3)?,
        }),
        _ => None,
    };
    Ok((start.unwrap_or_default(), held))
}

/// How a procedure's refusal (SQLSTATE 45000) begins: a group of steps
/// answers an item it refused with the refusal's text.
pub const CONTRADICTED: &str = "inconsistent: ";

/// A procedure answered something this code does not know: the database
/// runs other migrations than this binary was built with.
fn unexpected(procedure: &'static str, answer: Option<&str>) -> FenceError {
    FenceError::Stored(UnknownValue {
        kind: procedure,
        value: answer.unwrap_or("NULL").to_string(),
    })
}

#[cfg(test)]
mod tests {
    /// Both databases run the same fence: one text, two migrations (a
    /// migrator reads one folder per database).
    #[test]
    fn both_databases_get_the_same_fence_procedures() {
        assert_eq!(
            include_str!("../../../migrations/20261207000001_fence_procedures.sql"),
            include_str!("../../../migrations/wallet/20261207000001_fence_procedures.sql"),
        );
    }
}
