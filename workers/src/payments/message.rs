//! The reliable-message payment mode: the wallet debits and writes a
//! "debited" message in one local transaction, a relay publishes it, and
//! the order side settles on it. The buyer is answered `202` as soon as
//! the wallet has debited; the order shows `paying` until the message
//! lands.
//!
//! ```text
//!  log started ─▶ hold order (unpaid→paying) ─▶ wallet: debit + outbox ─▶ 202
//!                                                  │ relay, queue
//!                                                  ▼
//!       settle { consumed message, order paid, log committed }  (one local transaction,
//!                                          with the other messages of its group: Settles)
//!
//!  refused / silent wallet ─▶ check-back (resolve): cancelled ─▶ order back to unpaid, log aborted
//!                                                   debited   ─▶ settle
//!  a debit landing on a payment already given up ─▶ refund message ─▶ wallet refunds
//! ```
//!
//! The check-back is the local-transaction check of the design: the api
//! asks the wallet what became of a debit it did not hear about, and a
//! "cancelled" answer is recorded in the wallet's fence so the debit can
//! never happen afterwards. Only then is the order given back. Every
//! message is delivered at least once; [`settle`] dedupes by message id
//! and by the log's state, so a repeat changes nothing.

use serde::{Deserialize, Serialize};
use sqlx::{MySqlPool, Row};

use super::fence::EndOutcome;
use super::log::{self, PayTx};
use super::order_branch::{self, HoldOutcome};
use super::wallet_client::WalletCallError;
use super::{wallet_failure, PayError, Payments, Step};
use crate::group_commit::{self, GroupCommit, GroupLimits};
use crate::orders::{retry_on_deadlock, MaybeDeadlock, OrderError};
use crate::outbox;
use crate::statuses::{AbortReason, TxState};
use crate::wallet::message::{DebitOutcome, Resolution};

/// What a payment message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    /// Wallet → api: the order's amount was debited.
    Debited,
    /// Api → wallet: give a debit back (its payment was given up first).
    Refund,
}

/// A message of the payment queues (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentMessage {
    /// Unique per message: what receivers dedupe on.
    pub message_id: String,
    pub kind: MessageKind,
    pub tx_id: String,
    pub order_id: String,
    pub user_id: u64,
    pub amount_cents: i64,
}

impl PaymentMessage {
    pub fn new(
        kind: MessageKind,
        tx_id: &str,
        order_id: &str,
        user_id: u64,
        amount_cents: i64,
    ) -> PaymentMessage {
        PaymentMessage {
            message_id: log::new_tx_id(),
            kind,
            tx_id: tx_id.to_string(),
            order_id: order_id.to_string(),
            user_id,
            amount_cents,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A body read off a queue, if it is a well-formed message.
    pub fn from_body(body: &[u8]) -> Option<PaymentMessage> {
        let m: PaymentMessage = serde_json::from_slice(body).ok()?;
        (log::valid_tx_id(&m.message_id) && log::valid_tx_id(&m.tx_id)).then_some(m)
    }
}

/// Pays `tx`: logs it together with the order's hold.
pub async fn pay(p: &Payments, tx: &PayTx) -> Result<Step, PayError> {
    let held = p.order_steps().log_and_hold(tx).await?;
    if held == HoldOutcome::Refused {
        // Logged `aborted`; nothing was held, the wallet never asked.
        return Ok(Step::Aborted(AbortReason::OrderNotPayable));
    }
    fail::fail_point!("message.after_hold", |_| Err(PayError::Injected(
        "message.after_hold"
    )));
    let debit = p.wallet_batches().message_debit(tx.wallet_request()).await;
    fail::fail_point!("message.after_debit", |_| Err(PayError::Injected(
        "message.after_debit"
    )));
    let reason = match debit {
        Ok(DebitOutcome::Debited | DebitOutcome::Repeat) => return Ok(Step::Decided),
        Ok(DebitOutcome::Cancelled) => return give_back(p, tx, AbortReason::Timeout).await,
        Ok(DebitOutcome::InsufficientFunds) => AbortReason::InsufficientFunds,
        Err(e) => wallet_failure(tx, "debit", e),
    };
    // The debit did not happen, or we do not know: ask, which also makes
    // sure it never happens later.
    Ok(match check_back(p, tx).await? {
        Some(false) => give_back(p, tx, reason).await?,
        // Debited after all, and settled by the check-back itself.
        Some(true) => Step::Committed,
        None => Step::Decided,
    })
}

/// The check-back: asks the wallet what became of `tx`'s debit and acts
/// on it. `Some(true)`: debited (and now settled); `Some(false)`:
/// cancelled for good; `None`: the wallet did not answer.
async fn check_back(p: &Payments, tx: &PayTx) -> Result<Option<bool>, PayError> {
    match p.wallet().message_resolve(&tx.tx_id).await {
        Ok(Resolution::Debited) => {
            settle(p, &tx.tx_id, &tx.tx_id).await?;
            Ok(Some(true))
        }
        Ok(Resolution::Cancelled) => Ok(Some(false)),
        Err(WalletCallError::Unavailable(why)) => {
            tracing::warn!(tx_id = %tx.tx_id, %why, "wallet check-back unanswered; recovery retries");
            Ok(None)
        }
        Err(e) => Err(PayError::Wallet(e)),
    }
}

/// Decides `aborting` and gives the order back; only called once the
/// wallet has nothing of this transaction (never asked, or resolved
/// cancelled).
pub async fn give_back(p: &Payments, tx: &PayTx, reason: AbortReason) -> Result<Step, PayError> {
    p.decide_abort(tx, reason).await?;
    fail::fail_point!("message.after_decide_abort", |_| Err(PayError::Injected(
        "message.after_decide_abort"
    )));
    finish_give_back(p, tx).await?;
    Ok(Step::Aborted(reason))
}

/// The order back to `unpaid` (a Cancel of its branch) and the log
/// `aborted`; true when done.
pub async fn finish_give_back(p: &Payments, tx: &PayTx) -> Result<bool, PayError> {
    if p.order_steps().cancel(&tx.tx_id).await? == EndOutcome::Refused {
        return Err(PayError::Inconsistent(format!(
            "{}: the order's branch refused to give the order back",
            tx.tx_id
        )));
    }
    p.end_log(tx, TxState::Aborting, TxState::Aborted).await?;
    Ok(true)
}

/// What settling a debit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The order is paid now.
    Paid,
    /// This message, or this transaction, was settled before.
    Duplicate,
    /// The payment had been given up: a refund message is on its way.
    Refunded,
    /// No such transaction in this deployment's log: ignored.
    Unknown,
}

/// Why settling failed (it is retried: the message is requeued).
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error("MySQL: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Branch(#[from] order_branch::BranchError),
    #[error("{0}")]
    Inconsistent(String),
}

impl MaybeDeadlock for SettleError {
    fn is_deadlock(&self) -> bool {
        match self {
            SettleError::Db(e) => e.is_deadlock(),
            SettleError::Branch(e) => e.is_deadlock(),
            SettleError::Inconsistent(_) => false,
        }
    }
}

impl From<SettleError> for PayError {
    fn from(e: SettleError) -> PayError {
        match e {
            SettleError::Db(e) => PayError::Order(OrderError::Db(e)),
            SettleError::Branch(e) => PayError::Branch(e),
            SettleError::Inconsistent(what) => PayError::Inconsistent(what),
        }
    }
}

/// The settles as the consumer runs them under load: each debited message
/// joins a group of the others the consumer holds, settled as one local
/// transaction (`order_settle_set`, [`crate::group_commit`]). [`settle`]
/// runs one alone, as a group of one (the check-back, tools, tests).
pub struct Settles {
    settles: GroupCommit<SettleItem, GroupOutcome, SettleError>,
}

impl Settles {
    /// Starts the runner on the current runtime.
    pub fn start(db: &MySqlPool, limits: GroupLimits) -> Settles {
        Settles {
            settles: GroupCommit::start(limits, group_commit::on_pool(db, settle_group)),
        }
    }

    /// See [`settle`].
    pub async fn settle(
        &self,
        p: &Payments,
        tx_id: &str,
        message_id: &str,
    ) -> Result<Settled, SettleError> {
        let outcome = self.settles.run(SettleItem::new(tx_id, message_id)).await?;
        after_settle(p, tx_id, message_id, outcome).await
    }
}

/// Settles transaction `tx_id` on message `message_id` (the check-back
/// uses the transaction id as its message id), in one local transaction
/// with the record that the message was consumed.
pub async fn settle(p: &Payments, tx_id: &str, message_id: &str) -> Result<Settled, SettleError> {
    let run = group_commit::on_pool(p.db(), settle_group);
    let outcome = group_commit::alone(&run, SettleItem::new(tx_id, message_id)).await?;
    after_settle(p, tx_id, message_id, outcome).await
}

/// What the group's answer leaves to do: a debit that landed on a payment
/// given up is refunded (rare, so in a transaction of its own).
async fn after_settle(
    p: &Payments,
    tx_id: &str,
    message_id: &str,
    outcome: GroupOutcome,
) -> Result<Settled, SettleError> {
    let settled = match outcome {
        GroupOutcome::Settled(settled) => return Ok(settled),
        GroupOutcome::GivenUp => {
            retry_on_deadlock(|| refund_given_up(p, tx_id, message_id)).await?
        }
    };
    if settled == Settled::Refunded {
        p.wake_refund_relay();
    }
    Ok(settled)
}

/// What one item of a settle group came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GroupOutcome {
    Settled(Settled),
    /// The payment had been given up: nothing kept, the refund is left to
    /// [`after_settle`].
    GivenUp,
}

/// One settle of a group. Groups run in this order: by transaction, the
/// log row each locks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SettleItem {
    tx_id: String,
    message_id: String,
}

impl SettleItem {
    fn new(tx_id: &str, message_id: &str) -> SettleItem {
        SettleItem {
            tx_id: tx_id.to_string(),
            message_id: message_id.to_string(),
        }
    }
}

/// The `order_settle_set` procedure: for each message, the log's row,
/// the consumed record, the order's Confirm and the log `committed` (set
/// statements for a group of plain settles, else `order_settle_group`).
async fn settle_group(
    db: MySqlPool,
    items: Vec<SettleItem>,
) -> Result<Vec<Result<GroupOutcome, SettleError>>, SettleError> {
    fail::fail_point!("message.before_settle_commit", |_| Err(
        SettleError::Inconsistent("fault injected at message.before_settle_commit".into())
    ));
    let args: Vec<serde_json::Value> = items
        .iter()
        .map(|s| serde_json::json!([s.tx_id, s.message_id]))
        .collect();
    let outcomes =
        group_commit::call_procedure(&db, "CALL order_settle_set(?)", &args, &[]).await?;
    Ok(items
        .iter()
        .zip(outcomes)
        .map(|(item, o)| match o.as_deref() {
            Some("paid") => Ok(GroupOutcome::Settled(Settled::Paid)),
            Some("duplicate") => Ok(GroupOutcome::Settled(Settled::Duplicate)),
            Some("given_up") => Ok(GroupOutcome::GivenUp),
            Some("unknown") => {
                tracing::error!(tx_id = %item.tx_id, message_id = %item.message_id,
                    "a debited message for an unknown payment; ignored");
                Ok(GroupOutcome::Settled(Settled::Unknown))
            }
            Some(other) => Err(SettleError::Inconsistent(format!(
                "{}: {other}",
                item.tx_id
            ))),
            None => Err(SettleError::Inconsistent(format!(
                "{}: order_settle_set answered nothing",
                item.tx_id
            ))),
        })
        .collect())
}

/// A debit that landed on a payment given up: a refund message enters
/// the outbox, in one local transaction with the record that the message
/// was consumed (so a redelivery refunds nothing twice).
async fn refund_given_up(
    p: &Payments,
    tx_id: &str,
    message_id: &str,
) -> Result<Settled, SettleError> {
    let mut t = p.db().begin().await?;
    // The log's row first, as the group procedure takes it.
    let row = sqlx::query(
        "SELECT CAST(state AS CHAR) AS state, order_id, user_id, amount_cents \
         FROM pay_transactions WHERE tx_id = ? FOR UPDATE",
    )
    .bind(tx_id)
    .fetch_one(&mut *t)
    .await?;
    let fresh = sqlx::query("INSERT IGNORE INTO consumed_messages (message_id) VALUES (?)")
        .bind(message_id)
        .execute(&mut *t)
        .await?
        .rows_affected()
        == 1;
    if !fresh {
        t.commit().await?;
        return Ok(Settled::Duplicate);
    }
    let state: String = row.try_get("state")?;
    if !matches!(
        state.parse::<TxState>(),
        Ok(TxState::Aborting | TxState::Aborted)
    ) {
        return Err(SettleError::Inconsistent(format!(
            "{tx_id}: refunding a debit of a payment that is {state}"
        )));
    }
    let refund = PaymentMessage::new(
        MessageKind::Refund,
        tx_id,
        &row.try_get::<String, _>("order_id")?,
        row.try_get("user_id")?,
        row.try_get("amount_cents")?,
    );
    outbox::put(&mut t, &refund.message_id, &refund.to_json()).await?;
    tracing::warn!(%tx_id, "a debit landed on a payment given up; refunding");
    fail::fail_point!("message.before_settle_commit", |_| Err(
        SettleError::Inconsistent("fault injected at message.before_settle_commit".into())
    ));
    t.commit().await?;
    Ok(Settled::Refunded)
}

/// The consumer of the payment queue: settles each debited message.
pub async fn on_debited(p: &Payments, body: &[u8]) -> Result<(), SettleError> {
    let Some(m) = PaymentMessage::from_body(body) else {
        tracing::error!(body = %String::from_utf8_lossy(body), "unreadable payment message; dropped");
        return Ok(());
    };
    if m.kind != MessageKind::Debited {
        tracing::error!(message_id = %m.message_id, "a {:?} message on the payment queue; dropped", m.kind);
        return Ok(());
    }
    p.settles()
        .settle(p, &m.tx_id, &m.message_id)
        .await
        .map(|_| ())
}

/// Deletes the records of messages consumed more than `older_than_secs`
/// ago (at most a batch per call); how many.
pub async fn prune_consumed(p: &Payments, older_than_secs: u64) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "DELETE FROM consumed_messages WHERE consumed_at < NOW(3) - INTERVAL ? SECOND LIMIT 1000",
    )
    .bind(older_than_secs)
    .execute(p.db())
    .await?
    .rows_affected())
}

/// Recovery of a `message` transaction left open: a `started` one is
/// checked back with the wallet (settled if debited, given back if not);
/// an `aborting` one is given back. True once it ended.
pub async fn recover(p: &Payments, tx: &PayTx) -> Result<bool, PayError> {
    match tx.state {
        TxState::Started | TxState::Committing => Ok(match check_back(p, tx).await? {
            Some(true) => true,
            Some(false) => {
                give_back(p, tx, AbortReason::Timeout).await?;
                true
            }
            None => false,
        }),
        TxState::Aborting => finish_give_back(p, tx).await,
        TxState::Committed | TxState::Aborted => Ok(true),
    }
}

/// Every fail point of this mode, in the order a payment passes them.
pub const FAIL_POINTS: &[&str] = &[
    "message.after_hold",
    "message.after_debit",
    "message.after_decide_abort",
    "message.before_settle_commit",
];
