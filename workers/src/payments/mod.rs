//! Paying an order across two databases: the order database (here) and
//! the wallet's (behind the wallet service), in the deployment's
//! `payment.mode`. The api is the coordinator.
//!
//! | module | what |
//! |---|---|
//! | [`log`] | the coordinator's log (`pay_transactions`): every attempt, and its decision, before any branch moves |
//! | [`fence`] | the TCC fence both participants keep (empty rollback, idempotence, suspension) |
//! | [`order_branch`] | the order's TCC branch: `unpaid → paying → paid`, or back |
//! | [`tcc`] | the TCC coordinator |
//! | [`xa_branch`] | MariaDB XA branches (prepare, commit, rollback, `XA RECOVER`), as both participants use them |
//! | [`xa`] | the XA (two-phase commit) coordinator |
//! | [`message`] | the reliable-message mode: the check-back, settling on the wallet's message, refunds |
//! | [`recovery`] | drives every transaction left open (a crash, a timeout) to its end; one api at a time |
//! | [`wallet_client`] | the wallet's internal routes over HTTP |
//! | [`wallet_batches`] | concurrent payments' wallet calls, sent together |
//! | [`audit`] | `seckillctl audit --payments`: SPEC invariant 7 across both databases |
//!
//! [`Payments::pay`] is what `POST /orders/{id}/pay` calls: it checks the
//! order, logs the transaction, runs the mode, and says what the buyer is
//! told. A paid order is never closed and a closed one never paid, in every
//! mode: a payment holds the order as `paying`, and nothing closes that.

pub mod audit;
pub mod fence;
pub mod log;
pub mod message;
pub mod order_branch;
pub mod recovery;
pub mod tcc;
pub mod wallet_batches;
pub mod wallet_client;
pub mod xa;
pub mod xa_branch;

use chrono::Utc;
use redis::aio::ConnectionLike;
use seckill_contracts::config::{PaymentConfig, PaymentMode};
use seckill_contracts::keys::KeySchema;
use sqlx::MySqlPool;

pub use log::valid_tx_id;

use crate::orders::{self, Order, OrderError};
use crate::statuses::{AbortReason, OrderStatus};
use wallet_client::{WalletCallError, WalletClient};

/// Why a payment failed to run (as opposed to what it decided).
#[derive(Debug, thiserror::Error)]
pub enum PayError {
    #[error(transparent)]
    Log(#[from] log::LogError),
    #[error(transparent)]
    Order(#[from] OrderError),
    #[error(transparent)]
    Branch(#[from] order_branch::BranchError),
    #[error(transparent)]
    Wallet(#[from] WalletCallError),
    #[error(transparent)]
    Xa(#[from] xa_branch::XaError),
    /// A participant answered what the coordinator's decision rules out.
    #[error("payment inconsistency: {0}")]
    Inconsistent(String),
    /// A fail point cut the payment here (tests only).
    #[error("fault injected at {0}")]
    Injected(&'static str),
    /// The XA group this payment ran in failed as a whole.
    #[error("the payment's XA group failed: {0}")]
    Group(String),
}

impl From<sqlx::Error> for PayError {
    fn from(e: sqlx::Error) -> PayError {
        PayError::Log(log::LogError::Db(e))
    }
}

impl PayError {
    /// This error as each payment of a failed group gets it.
    pub(crate) fn for_each_payment(&self) -> PayError {
        match self {
            PayError::Injected(point) => PayError::Injected(point),
            other => PayError::Group(other.to_string()),
        }
    }
}

/// Where a mode left a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Every branch committed.
    Committed,
    /// Decided to commit; a branch has not confirmed yet (recovery will).
    Decided,
    /// Aborted, for this reason; every branch undone (or being undone).
    Aborted(AbortReason),
}

/// What the buyer is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayResult {
    /// Paid now.
    Paid(Order),
    /// The payment is decided and finishing: the order shows `paying`
    /// until it is paid (202).
    Settling(Order),
    /// Paid before (409).
    AlreadyPaid,
    /// Closed (cancelled or timed out) before it could be paid (409).
    Closed,
    /// Another payment of this order is running (409).
    InProgress,
    /// The wallet's balance does not cover the order; nothing moved (402).
    InsufficientFunds,
    /// The wallet could not be reached; nothing moved (503).
    Unavailable,
    /// No such order of this buyer (404).
    NotFound,
}

/// Why a wallet branch call that got no usable answer ends its payment,
/// logged: silent (it may or may not have acted; the branch's end call
/// settles that) or refused (it did nothing). `step` names the call.
pub(crate) fn wallet_failure(tx: &log::PayTx, step: &str, e: WalletCallError) -> AbortReason {
    match e {
        WalletCallError::Unavailable(why) => {
            tracing::warn!(tx_id = %tx.tx_id, %why, "wallet {step} unanswered");
            AbortReason::WalletUnavailable
        }
        e @ WalletCallError::Refused { .. } => {
            tracing::error!(tx_id = %tx.tx_id, error = %e, "wallet refused a {step}");
            AbortReason::WalletRefused
        }
    }
}

/// The coordinator: the order database, the wallet client, the mode.
pub struct Payments {
    db: MySqlPool,
    /// The log's own connections (same database): a log write must never
    /// queue behind sessions that wait on an order row an in-doubt XA
    /// branch has locked, since that branch ends only after the write.
    log_db: MySqlPool,
    keys: KeySchema,
    config: PaymentConfig,
    wallet: std::sync::Arc<WalletClient>,
    /// The order branch's steps, run in groups.
    order_steps: order_branch::OrderSteps,
    /// The log's moves (decisions, last moves), run in groups (through
    /// `log_db`).
    log_moves: log::LogMoves,
    /// `xa` mode: payments, in groups of one XA transaction each.
    xa_groups: xa::XaGroups,
    /// `tcc` and `message` modes: the wallet calls, batched.
    wallet_batches: wallet_batches::WalletBatches,
    /// The order read before and after paying, in groups.
    order_reads: orders::OrderReads,
    /// `message` mode: the consumer's settles, in groups.
    settles: message::Settles,
    /// Wakes the refund relay (`message` mode) after a settle wrote one.
    refund_wake: std::sync::Arc<tokio::sync::Notify>,
}

impl Payments {
    pub fn new(
        db: MySqlPool,
        keys: KeySchema,
        config: &seckill_contracts::config::Config,
    ) -> Payments {
        let log_db = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(config.database.max_connections)
            .connect_lazy_with((*db.connect_options()).clone());
        let groups = crate::group_commit::GroupLimits::from_config(&config.payment);
        let order_steps = order_branch::OrderSteps::start(&db, groups);
        let log_moves = log::LogMoves::start(&log_db, groups);
        let wallet = std::sync::Arc::new(WalletClient::new(config));
        let xa_groups = xa::XaGroups::start(&db, &log_db, wallet.clone(), groups);
        let wallet_batches = wallet_batches::WalletBatches::start(&wallet, groups);
        let order_reads = orders::OrderReads::start(&db, groups);
        let settles = message::Settles::start(&db, groups);
        Payments {
            order_reads,
            settles,
            db,
            log_db,
            order_steps,
            log_moves,
            xa_groups,
            wallet_batches,
            keys,
            config: config.payment.clone(),
            wallet,
            refund_wake: Default::default(),
        }
    }

    pub fn db(&self) -> &MySqlPool {
        &self.db
    }

    /// The pool the coordinator's log is written through.
    pub fn log_db(&self) -> &MySqlPool {
        &self.log_db
    }

    /// `message` mode: the consumer's settles (grouped).
    pub fn settles(&self) -> &message::Settles {
        &self.settles
    }

    /// The order branch's TCC steps (grouped with other payments').
    pub fn order_steps(&self) -> &order_branch::OrderSteps {
        &self.order_steps
    }

    /// A transaction's last move in the log (`committed`, `aborted`): no
    /// caller acts on whether its own call moved the row.
    pub(crate) async fn end_log(
        &self,
        tx: &log::PayTx,
        from: crate::statuses::TxState,
        to: crate::statuses::TxState,
    ) -> Result<(), PayError> {
        self.log_moves.advance(&tx.tx_id, from, to, None).await?;
        Ok(())
    }

    /// `tcc` and `message` modes: the wallet's branch calls, batched with
    /// other payments'.
    pub fn wallet_batches(&self) -> &wallet_batches::WalletBatches {
        &self.wallet_batches
    }

    /// `xa` mode: the queue into payment groups.
    pub(crate) fn xa_groups(&self) -> &xa::XaGroups {
        &self.xa_groups
    }

    /// `xa` mode: what a group runs against.
    pub(crate) fn xa_sides(&self) -> xa::Sides<'_> {
        xa::Sides {
            db: &self.db,
            log_db: &self.log_db,
            wallet: &self.wallet,
        }
    }

    /// A move of `tx` in the log, in a group with other payments'; true
    /// when this call moved it (see [`log::LogMoves`]).
    pub(crate) async fn advance_log(
        &self,
        tx: &log::PayTx,
        from: crate::statuses::TxState,
        to: crate::statuses::TxState,
        reason: Option<AbortReason>,
    ) -> Result<bool, PayError> {
        Ok(self.log_moves.advance(&tx.tx_id, from, to, reason).await?)
    }

    pub fn wallet(&self) -> &WalletClient {
        &self.wallet
    }

    pub fn config(&self) -> &PaymentConfig {
        &self.config
    }

    /// Decides `aborting` for `tx` (still `started`), unless it is already
    /// decided so: every mode's abort starts here. Any other state means
    /// the transaction was decided the other way, which no caller expects.
    pub(crate) async fn decide_abort(
        &self,
        tx: &log::PayTx,
        reason: AbortReason,
    ) -> Result<(), PayError> {
        use crate::statuses::TxState;
        let moved = self
            .advance_log(tx, TxState::Started, TxState::Aborting, Some(reason))
            .await?;
        if moved {
            return Ok(());
        }
        match log::get(&self.log_db, &tx.tx_id).await?.map(|t| t.state) {
            Some(TxState::Aborting | TxState::Aborted) => Ok(()),
            now => Err(PayError::Inconsistent(format!(
                "{}: aborting a transaction that is {now:?}",
                tx.tx_id
            ))),
        }
    }

    pub(crate) fn wake_refund_relay(&self) {
        self.refund_wake.notify_one();
    }

    /// `message` mode: starts this api's consumer of the wallet's debited
    /// messages and its relay of refunds; they run until the returned
    /// value is dropped. (In other modes nothing is started.)
    pub fn start_messaging(
        self: &std::sync::Arc<Payments>,
        config: &seckill_contracts::config::Config,
    ) -> crate::outbox::Running {
        let running = crate::outbox::Running::new();
        if config.payment.mode != PaymentMode::Message {
            return running;
        }
        crate::outbox::spawn_relay(
            config,
            self.db.clone(),
            config.amqp.refund_queue.clone(),
            self.refund_wake.clone(),
            running.stopped(),
        );
        let payments = self.clone();
        let groups = crate::group_commit::GroupLimits::from_config(&config.payment);
        crate::outbox::spawn_consumer(
            config,
            config.amqp.payment_queue.clone(),
            // Settles join groups and hold no connection while they wait:
            // enough at once to fill every group in flight.
            groups.max_items * groups.in_flight,
            move |body| {
                let payments = payments.clone();
                async move { message::on_debited(&payments, &body).await }
            },
            running.stopped(),
        );
        running
    }

    /// Pays `user_id`'s order `order_id` (see [`PayResult`]).
    pub async fn pay<C: ConnectionLike>(
        &self,
        redis: &mut C,
        user_id: u64,
        order_id: &str,
    ) -> Result<PayResult, PayError> {
        let Some(order) = self.order_reads.get_for_user(user_id, order_id).await? else {
            return Ok(PayResult::NotFound);
        };
        if let Some(settled) = self.not_payable(redis, &order).await? {
            return Ok(settled);
        }
        let tx = log::PayTx {
            tx_id: log::new_tx_id(),
            order_id: order.id.clone(),
            user_id,
            sale_id: order.sale_id,
            amount_cents: order.amount_cents,
            mode: self.config.mode,
            state: crate::statuses::TxState::Started,
            xa_group: None,
        };
        // Each mode logs the transaction before it touches a branch.
        let step = match tx.mode {
            PaymentMode::Tcc => tcc::pay(self, &tx).await?,
            PaymentMode::Xa => xa::pay(self, &tx).await?,
            PaymentMode::Message => message::pay(self, &tx).await?,
        };
        self.answer(redis, user_id, &order, step).await
    }

    /// What to answer without paying: the order as it stands says no (or
    /// it expired just now and is closed here, returning its stock, so the
    /// answer never depends on whether the closer ran yet).
    async fn not_payable<C: ConnectionLike>(
        &self,
        redis: &mut C,
        order: &Order,
    ) -> Result<Option<PayResult>, PayError> {
        Ok(match order.status {
            OrderStatus::Paid => Some(PayResult::AlreadyPaid),
            OrderStatus::Closed => Some(PayResult::Closed),
            OrderStatus::Paying => Some(PayResult::InProgress),
            OrderStatus::Unpaid if order.expires_at <= Utc::now() => {
                orders::close_expired_one(&self.db, redis, &self.keys, &order.id).await?;
                Some(PayResult::Closed)
            }
            OrderStatus::Unpaid => None,
        })
    }

    async fn answer<C: ConnectionLike>(
        &self,
        redis: &mut C,
        user_id: u64,
        order: &Order,
        step: Step,
    ) -> Result<PayResult, PayError> {
        let now = self.order_reads.get_for_user(user_id, &order.id).await?;
        let Some(now) = now else {
            return Ok(PayResult::NotFound);
        };
        Ok(match step {
            Step::Committed => PayResult::Paid(now),
            // Decided, and the order's branch already ended paid (TCC
            // confirms it with the decision; XA may commit it before the
            // wallet's branch): paid for the buyer, though the wallet's
            // side is still being finished, by recovery if need be.
            Step::Decided if now.status == OrderStatus::Paid => PayResult::Paid(now),
            Step::Decided => PayResult::Settling(now),
            Step::Aborted(AbortReason::InsufficientFunds) => PayResult::InsufficientFunds,
            Step::Aborted(AbortReason::OrderNotPayable) => {
                match self.not_payable(redis, &now).await? {
                    Some(r) => r,
                    // Unpaid and not expired, yet the Try refused: another
                    // payment held it a moment ago.
                    None => PayResult::InProgress,
                }
            }
            Step::Aborted(_) => PayResult::Unavailable,
        })
    }
}
