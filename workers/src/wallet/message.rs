//! The wallet's side of the `message` payment mode.
//!
//! * [`debit`]: the order's amount leaves the balance and a "debited"
//!   message enters the outbox, in one local transaction (the relay then
//!   publishes it to the api);
//! * [`resolve`]: the api's check-back on a payment whose debit it never
//!   heard about: debited, or cancelled from now on (recorded, so a debit
//!   arriving later is refused);
//! * [`refund`]: the api's compensating message for a debit whose payment
//!   it had already given up: the money goes back, once.
//!
//! The debit and the check-back meet in the TCC fence (branch `message`):
//! a debit records its phase as confirmed, a check-back that finds nothing
//! records a cancel, so whichever comes first decides.

use serde::{Deserialize, Serialize};
use sqlx::MySqlPool;

use crate::group_commit::{self, GroupCommit, GroupLimits};
use crate::orders::retry_on_deadlock;

use super::accounts::{self, Movement, WalletError};
use crate::payments::fence::{self, CancelStart};
use crate::payments::message::{MessageKind, PaymentMessage};
use crate::statuses::LedgerKind;

/// This branch's name in the fence.
pub const BRANCH: &str = "message";

/// What a debit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DebitOutcome {
    /// Debited now; the message is in the outbox.
    Debited,
    /// Debited by an earlier call of this transaction.
    Repeat,
    /// The api's check-back cancelled this transaction first: nothing.
    Cancelled,
    /// The balance does not cover the amount: nothing.
    InsufficientFunds,
}

/// What a check-back found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// The money was debited (its message is on its way).
    Debited,
    /// Nothing was debited, and nothing will be.
    Cancelled,
}

/// The message mode's debits as the service runs them under load: each
/// joins a group of other payments' debits, run as one local transaction
/// (`wallet_debit_set`, [`crate::group_commit`]). [`debit`] runs one
/// alone, as a group of one (tools, tests).
pub struct Debits {
    debits: GroupCommit<DebitItem, DebitOutcome, WalletError>,
}

impl Debits {
    /// Starts the runner on the current runtime.
    pub fn start(db: &MySqlPool, limits: GroupLimits) -> Debits {
        Debits {
            debits: GroupCommit::start(limits, group_commit::on_pool(db, debit_group)),
        }
    }

    /// See [`debit`].
    pub async fn debit(
        &self,
        tx_id: &str,
        user_id: u64,
        order_id: &str,
        amount_cents: i64,
    ) -> Result<DebitOutcome, WalletError> {
        self.debits
            .run(DebitItem::new(tx_id, user_id, order_id, amount_cents))
            .await
    }
}

/// Debits `amount_cents` from `user_id` for `order_id` in transaction
/// `tx_id`, with its message in the outbox, in one local transaction.
pub async fn debit(
    db: &MySqlPool,
    tx_id: &str,
    user_id: u64,
    order_id: &str,
    amount_cents: i64,
) -> Result<DebitOutcome, WalletError> {
    let item = DebitItem::new(tx_id, user_id, order_id, amount_cents);
    group_commit::alone(&group_commit::on_pool(db, debit_group), item).await
}

/// One debit of a group. Groups run in this order: by user, the wallet
/// row a debit locks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct DebitItem {
    user_id: u64,
    tx_id: String,
    order_id: String,
    amount_cents: i64,
}

impl DebitItem {
    fn new(tx_id: &str, user_id: u64, order_id: &str, amount_cents: i64) -> DebitItem {
        DebitItem {
            user_id,
            tx_id: tx_id.to_string(),
            order_id: order_id.to_string(),
            amount_cents,
        }
    }
}

/// The `wallet_debit_set` procedure: for each debit, the fence, the
/// movement, the "debited" message in the outbox and the fence's phase
/// (set statements for a group of plain debits, else `wallet_debit_group`).
/// Each item carries its message, made here: a group run again after a
/// deadlock writes new message ids, which is fine, since nothing of the
/// rolled-back run was kept.
async fn debit_group(
    db: MySqlPool,
    items: Vec<DebitItem>,
) -> Result<Vec<Result<DebitOutcome, WalletError>>, WalletError> {
    let args: Vec<serde_json::Value> = items
        .iter()
        .map(|d| {
            let message = PaymentMessage::new(
                MessageKind::Debited,
                &d.tx_id,
                &d.order_id,
                d.user_id,
                d.amount_cents,
            );
            serde_json::json!([
                d.tx_id,
                d.user_id,
                d.order_id,
                d.amount_cents,
                message.message_id,
                message.to_json()
            ])
        })
        .collect();
    let outcomes =
        group_commit::call_procedure(&db, "CALL wallet_debit_set(?)", &args, &[]).await?;
    Ok(outcomes
        .into_iter()
        .map(|o| match o.as_deref() {
            Some("debited") => Ok(DebitOutcome::Debited),
            Some("repeat") => Ok(DebitOutcome::Repeat),
            Some("cancelled") => Ok(DebitOutcome::Cancelled),
            Some("insufficient_funds") => Ok(DebitOutcome::InsufficientFunds),
            other => Err(super::tcc::unknown("wallet_debit outcome", other)),
        })
        .collect())
}

/// The check-back: what became of `tx_id`'s debit (a cancel is recorded
/// when there was none).
pub async fn resolve(db: &MySqlPool, tx_id: &str) -> Result<Resolution, WalletError> {
    retry_on_deadlock(|| resolve_once(db, tx_id)).await
}

async fn resolve_once(db: &MySqlPool, tx_id: &str) -> Result<Resolution, WalletError> {
    let mut tx = db.begin().await?;
    let resolution = match fence::begin_cancel(&mut tx, tx_id, BRANCH).await? {
        CancelStart::Empty | CancelStart::Repeat => Resolution::Cancelled,
        CancelStart::Confirmed => Resolution::Debited,
        CancelStart::Undo(_) => {
            return Err(WalletError::Inconsistent(format!(
                "{tx_id}: a message-mode debit left half done"
            )))
        }
    };
    tx.commit().await?;
    Ok(resolution)
}

/// A compensating refund of transaction `tx_id`'s debit, as the ledger
/// recorded it (never the amount a message claims), once: the ledger's
/// unique (transaction, kind) makes a repeat do nothing. False when there
/// was nothing to refund (refunded before, or no such debit).
pub async fn refund(db: &MySqlPool, tx_id: &str) -> Result<bool, WalletError> {
    retry_on_deadlock(|| refund_once(db, tx_id)).await
}

async fn refund_once(db: &MySqlPool, tx_id: &str) -> Result<bool, WalletError> {
    let mut tx = db.begin().await?;
    let debit: Option<(u64, i64, Option<String>)> = sqlx::query_as(
        "SELECT user_id, amount_cents, order_id FROM wallet_ledger WHERE tx_id = ? AND kind = ?",
    )
    .bind(tx_id)
    .bind(LedgerKind::Debit)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((user_id, amount_cents, order_id)) = debit else {
        tracing::error!(%tx_id, "refund of a transaction that debited nothing; ignored");
        return Ok(false);
    };
    let movement = Movement {
        user_id,
        kind: LedgerKind::Refund,
        amount_cents,
        order_id: order_id.as_deref(),
        tx_id: Some(tx_id),
    };
    match accounts::apply(&mut tx, &movement, false).await {
        Ok(_) => {}
        Err(WalletError::Db(e)) if accounts::is_duplicate_key(&e) => return Ok(false),
        Err(e) => return Err(e),
    }
    tx.commit().await?;
    tracing::info!(%tx_id, ?order_id, amount_cents, "payment refunded");
    Ok(true)
}

/// The consumer of the refund queue.
pub async fn on_refund(db: &MySqlPool, body: &[u8]) -> Result<(), WalletError> {
    let Some(m) = PaymentMessage::from_body(body) else {
        tracing::error!(body = %String::from_utf8_lossy(body), "unreadable refund message; dropped");
        return Ok(());
    };
    if m.kind != MessageKind::Refund {
        tracing::error!(message_id = %m.message_id, "a {:?} message on the refund queue; dropped", m.kind);
        return Ok(());
    }
    refund(db, &m.tx_id).await.map(|_| ())
}
