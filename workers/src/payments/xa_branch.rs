//! MariaDB XA as both participants of an `xa` payment use it: a branch
//! is a local transaction with a global name (the payment's transaction
//! id and the branch, `order` or `wallet`) that can be *prepared* (made
//! durable, locks kept) and later committed or rolled back, by this
//! connection or, once it is gone, by any other.
//!
//! ```text
//!   start ─▶ (the branch's statements) ─▶ prepare ─▶ commit | rollback
//!                      └─ refused ─▶ rollback_active (nothing was prepared)
//! ```
//!
//! A prepared branch survives its connection (MariaDB ≥ 10.5): when the
//! process holding it dies, the branch waits, locks held, in `XA RECOVER`
//! until recovery ends it the way the coordinator's log says. While the
//! connection that prepared it is alive, no other session can end it
//! (`XAER_NOTA`): [`end_detached`] answers [`Detached::Busy`] then, and
//! the caller retries later.
//!
//! A connection in the middle of a branch must never go back to the pool
//! (the next user would find an XA transaction on it): [`BranchConn`]
//! closes its connection when dropped unless the branch ended cleanly.
//!
//! XA statements run as plain text (`raw_sql`): MariaDB does not prepare
//! them. The xid is built only from a checked transaction id and a
//! constant branch name, never from anything else.

use sqlx::mysql::MySql;
use sqlx::pool::PoolConnection;
use sqlx::{Executor, MySqlConnection, MySqlPool, Row};

use super::log::valid_tx_id;

/// The XA format id of this platform's branches, so `XA RECOVER` output
/// of anything else sharing the server is never touched.
pub const FORMAT_ID: i64 = 5_315_143;

/// SQLSTATE of `XAER_NOTA`: no such XA transaction (or one held by
/// another live session).
const XAER_NOTA: &str = "XAE04";

/// SQLSTATE of `XAER_DUPID`: a branch of this name exists already.
const XAER_DUPID: &str = "XAE08";

/// Why an XA step failed.
#[derive(Debug, thiserror::Error)]
pub enum XaError {
    #[error("MySQL: {0}")]
    Db(#[from] sqlx::Error),
    #[error("not a transaction id: {0:?}")]
    BadId(String),
    /// `XA START` of a name that is taken: this branch was started (and
    /// prepared) before.
    #[error("XA branch {0} exists already")]
    Duplicate(String),
}

/// A branch's global name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xid {
    tx_id: String,
    branch: &'static str,
}

impl Xid {
    pub fn new(tx_id: &str, branch: &'static str) -> Result<Xid, XaError> {
        if !valid_tx_id(tx_id) {
            return Err(XaError::BadId(tx_id.to_string()));
        }
        Ok(Xid {
            tx_id: tx_id.to_string(),
            branch,
        })
    }

    pub fn tx_id(&self) -> &str {
        &self.tx_id
    }

    /// `'gtrid','bqual',formatID`, as XA statements take it (both parts
    /// are checked: hex digits and a constant).
    fn sql(&self) -> String {
        format!("'{}','{}',{FORMAT_ID}", self.tx_id, self.branch)
    }
}

/// A connection inside an XA branch; closed on drop unless the branch
/// ended on it (then it returns to the pool).
pub struct BranchConn {
    conn: PoolConnection<MySql>,
    xid: Xid,
    clean: bool,
}

impl Drop for BranchConn {
    fn drop(&mut self) {
        if !self.clean {
            self.conn.close_on_drop();
        }
    }
}

impl BranchConn {
    /// `XA START` on a connection of `db`.
    pub async fn start(db: &MySqlPool, xid: Xid) -> Result<BranchConn, XaError> {
        let conn = db.acquire().await?;
        let mut branch = BranchConn {
            conn,
            xid,
            clean: false,
        };
        let sql = format!("XA START {}", branch.xid.sql());
        match branch.conn.execute(sqlx::raw_sql(&sql)).await {
            Ok(_) => Ok(branch),
            Err(e) if has_code(&e, XAER_DUPID) => {
                // Nothing started on this connection: it may go back.
                branch.clean = true;
                Err(XaError::Duplicate(branch.xid.tx_id.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn xid(&self) -> &Xid {
        &self.xid
    }

    /// The connection, for the branch's own statements.
    pub fn conn(&mut self) -> &mut MySqlConnection {
        &mut self.conn
    }

    /// `XA END` + `XA PREPARE`: the branch is durable and waits for
    /// [`commit`](Self::commit) or [`rollback`](Self::rollback).
    pub async fn prepare(&mut self) -> Result<(), XaError> {
        let xid = self.xid.sql();
        let sql = format!("XA END {xid}; XA PREPARE {xid}");
        self.conn.execute(sqlx::raw_sql(&sql)).await?;
        Ok(())
    }

    /// Ends a branch that was never prepared (it changed nothing durable).
    pub async fn rollback_active(mut self) -> Result<(), XaError> {
        let xid = self.xid.sql();
        let sql = format!("XA END {xid}; XA ROLLBACK {xid}");
        self.conn.execute(sqlx::raw_sql(&sql)).await?;
        self.clean = true;
        Ok(())
    }

    /// Phase two, commit, on the connection that prepared it.
    pub async fn commit(mut self) -> Result<(), XaError> {
        let sql = format!("XA COMMIT {}", self.xid.sql());
        self.conn.execute(sqlx::raw_sql(&sql)).await?;
        self.clean = true;
        Ok(())
    }

    /// Phase two, rollback, on the connection that prepared it.
    pub async fn rollback(mut self) -> Result<(), XaError> {
        let sql = format!("XA ROLLBACK {}", self.xid.sql());
        self.conn.execute(sqlx::raw_sql(&sql)).await?;
        self.clean = true;
        Ok(())
    }
}

/// What ending a branch from another session did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detached {
    /// Committed (or rolled back) now.
    Done,
    /// No such prepared branch: ended before, or never prepared.
    Absent,
    /// Prepared, but its connection is still alive somewhere: retry later.
    Busy,
}

/// Commits (`commit = true`) or rolls back a prepared branch from any
/// session (its own connection is gone: a crash, or it let it go).
pub async fn end_detached(db: &MySqlPool, xid: &Xid, commit: bool) -> Result<Detached, XaError> {
    let verb = if commit { "COMMIT" } else { "ROLLBACK" };
    let sql = format!("XA {verb} {}", xid.sql());
    let mut conn = db.acquire().await?;
    match conn.execute(sqlx::raw_sql(&sql)).await {
        Ok(_) => Ok(Detached::Done),
        Err(e) if has_code(&e, XAER_NOTA) => {
            // Unknown to this session: either no such branch, or one whose
            // session still holds it (it shows in XA RECOVER then).
            let waiting = prepared(&mut conn, xid.branch).await?;
            Ok(if waiting.iter().any(|t| t == xid.tx_id()) {
                Detached::Busy
            } else {
                Detached::Absent
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Transaction ids of this platform's prepared branches named `branch`
/// (the whole server's: the caller keeps those its own log knows).
pub async fn prepared(conn: &mut MySqlConnection, branch: &str) -> Result<Vec<String>, XaError> {
    let rows = conn.fetch_all(sqlx::raw_sql("XA RECOVER")).await?;
    let mut ids = Vec::new();
    for row in rows {
        let format: i64 = row.try_get(0)?;
        let gtrid_len: i64 = row.try_get(1)?;
        let data: Vec<u8> = row.try_get(3)?;
        if format != FORMAT_ID {
            continue;
        }
        let Ok(split) = usize::try_from(gtrid_len) else {
            continue;
        };
        if split > data.len() {
            continue;
        }
        let (gtrid, bqual) = data.split_at(split);
        if bqual != branch.as_bytes() {
            continue;
        }
        if let Ok(id) = std::str::from_utf8(gtrid) {
            if valid_tx_id(id) {
                ids.push(id.to_string());
            }
        }
    }
    Ok(ids)
}

fn has_code(e: &sqlx::Error, sqlstate: &str) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code == sqlstate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_xid_is_built_only_from_a_checked_id() {
        assert!(Xid::new("'; XA COMMIT 'x", "order").is_err());
        let id = super::super::log::new_tx_id();
        let xid = Xid::new(&id, "wallet").unwrap();
        assert_eq!(xid.sql(), format!("'{id}','wallet',{FORMAT_ID}"));
    }
}
