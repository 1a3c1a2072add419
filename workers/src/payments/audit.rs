//! `seckillctl audit --payments`: SPEC invariant 7 across the order
//! database (read here) and the wallet's (read through the wallet's
//! internal audit route, since nothing but the wallet opens it).
//!
//! Once no payment transaction is open and no payment message is in
//! flight (it waits, like the sale audit waits for quiet):
//!
//! 1. money is conserved: Σ balances + Σ frozen + Σ amounts of paid
//!    orders = Σ top-ups (refunds only return debits, so they cancel out);
//! 2. a paid order has exactly one debit and keeps its amount;
//! 3. an order that is not paid keeps no money (debits − refunds = 0);
//! 4. no TCC branch is left at `try` in either database, no XA branch of
//!    a logged transaction is left prepared, no transaction is left open.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use sqlx::MySqlPool;

use super::fence;
use super::log;
use super::order_branch;
use super::wallet_client::{WalletCallError, WalletClient};
use super::xa_branch::{self, XaError};
use crate::statuses::OrderStatus;

/// Violations listed per kind, at most this many order ids each.
const EXAMPLES: usize = 10;

/// Why the audit could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum PaymentsAuditError {
    #[error("MySQL: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Log(#[from] log::LogError),
    #[error(transparent)]
    Fence(#[from] fence::FenceError),
    #[error("the wallet service: {0}")]
    Wallet(#[from] WalletCallError),
    #[error(transparent)]
    Xa(#[from] XaError),
}

/// What the payments audit saw.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PaymentsReport {
    pub ok: bool,
    /// No payment transaction open.
    pub quiet: bool,
    pub open_transactions: i64,
    /// `message` mode: messages written and not yet published, and
    /// refunds asked for that the wallet has not made yet.
    pub messages_in_flight: i64,
    pub balances_cents: i64,
    pub frozen_cents: i64,
    pub paid_orders: i64,
    pub paid_orders_cents: i64,
    pub credited_cents: i64,
    pub open_fences_orders: i64,
    pub open_fences_wallet: i64,
    /// XA branches of this deployment's transactions still prepared.
    pub prepared_xa_orders: i64,
    pub prepared_xa_wallet: i64,
    pub violations: Vec<String>,
}

/// Audits payments, waiting up to `wait` for open transactions to end.
pub async fn run(
    db: &MySqlPool,
    wallet: &WalletClient,
    wait: Duration,
) -> Result<PaymentsReport, PaymentsAuditError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // The two databases are read one after the other: a payment that
        // started or ended meanwhile (another sale's buyers paying, say)
        // would show half done. Such a snapshot is not quiet, whatever
        // it saw: the log must be the same before and after it.
        let before = log::fingerprint(db).await?;
        let mut report = snapshot(db, wallet).await?;
        let moved = log::fingerprint(db).await? != before;
        if moved && report.quiet {
            report.quiet = false;
            report.ok = false;
            report.violations =
                vec!["invariant 7: payments started or ended during the audit; not quiet".into()];
        }
        if report.quiet || tokio::time::Instant::now() >= deadline {
            return Ok(report);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn snapshot(
    db: &MySqlPool,
    wallet: &WalletClient,
) -> Result<PaymentsReport, PaymentsAuditError> {
    let open_transactions = log::open_count(db).await?;
    let money = wallet.figures(0).await?;
    let orders: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT id, CAST(status AS CHAR), amount_cents FROM orders")
            .fetch_all(db)
            .await?;
    let mut conn = db.acquire().await?;
    let open_fences_orders = fence::open_branches(&mut conn, 0).await?;
    let order_branches = xa_branch::prepared(&mut conn, order_branch::BRANCH).await?;
    drop(conn);
    let prepared_xa_orders = ours(db, &order_branches).await?;
    let prepared_xa_wallet = ours(db, &money.prepared_xa).await?;

    let by_order: HashMap<&str, &crate::wallet::accounts::OrderMoney> = money
        .orders
        .iter()
        .map(|m| (m.order_id.as_str(), m))
        .collect();
    let mut checks = Checks::default();
    let (mut paid_orders, mut paid_orders_cents) = (0, 0);
    for (id, status, amount) in &orders {
        let moved = by_order.get(id.as_str());
        if status == OrderStatus::Paid.as_str() {
            paid_orders += 1;
            paid_orders_cents += amount;
            match moved {
                Some(m) if m.debits == 1 && m.net_cents == *amount => {}
                _ => checks.paid_without_one_debit.push(id.clone()),
            }
        } else if moved.is_some_and(|m| m.net_cents != 0) {
            checks.kept_money.push(format!("{id} ({status})"));
        }
    }
    let known: std::collections::HashSet<&str> = orders.iter().map(|o| o.0.as_str()).collect();
    checks.unknown = money
        .orders
        .iter()
        .filter(|m| !known.contains(m.order_id.as_str()))
        .map(|m| m.order_id.clone())
        .collect();

    // Per transaction: two debited messages of one given-up payment each
    // ask for its refund, and the wallet makes it once.
    let refunds_asked: i64 =
        sqlx::query_scalar("SELECT COUNT(DISTINCT JSON_VALUE(payload, '$.tx_id')) FROM outbox")
            .fetch_one(db)
            .await?;
    let refunds_made: i64 = money.orders.iter().map(|m| m.refunds).sum();
    let messages_in_flight = crate::outbox::pending(db).await?
        + money.outbox_pending
        + (refunds_asked - refunds_made).max(0);
    let quiet = open_transactions == 0 && messages_in_flight == 0;
    let mut violations = Vec::new();
    if !quiet {
        violations.push(format!(
            "invariant 7: {open_transactions} payment transactions still open, \
             {messages_in_flight} payment messages in flight"
        ));
    } else {
        let held = money.balances_cents + money.frozen_cents + paid_orders_cents;
        if held != money.credited_cents {
            violations.push(format!(
                "invariant 7: balances {} + frozen {} + paid orders {paid_orders_cents} = {held} \
                 != top-ups {}",
                money.balances_cents, money.frozen_cents, money.credited_cents
            ));
        }
        if prepared_xa_orders > 0 || prepared_xa_wallet > 0 {
            violations.push(format!(
                "invariant 7: XA branches left prepared: {prepared_xa_orders} orders, \
                 {prepared_xa_wallet} wallets"
            ));
        }
        if open_fences_orders > 0 || money.open_fences > 0 {
            violations.push(format!(
                "invariant 7: TCC branches left at try: {open_fences_orders} orders, {} wallets",
                money.open_fences
            ));
        }
    }
    if quiet {
        checks.report(&mut violations);
    }
    Ok(PaymentsReport {
        ok: violations.is_empty(),
        quiet,
        open_transactions,
        messages_in_flight,
        balances_cents: money.balances_cents,
        frozen_cents: money.frozen_cents,
        paid_orders,
        paid_orders_cents,
        credited_cents: money.credited_cents,
        open_fences_orders,
        open_fences_wallet: money.open_fences,
        prepared_xa_orders,
        prepared_xa_wallet,
        violations,
    })
}

/// How many of `groups` (prepared XA branches on a shared server) are
/// payment groups of this deployment's log.
async fn ours(db: &MySqlPool, groups: &[String]) -> Result<i64, PaymentsAuditError> {
    let mut n = 0;
    for group in groups {
        if log::xa_group_known(db, group).await? {
            n += 1;
        }
    }
    Ok(n)
}

/// Per-order findings.
#[derive(Default)]
struct Checks {
    paid_without_one_debit: Vec<String>,
    kept_money: Vec<String>,
    unknown: Vec<String>,
}

impl Checks {
    fn report(self, violations: &mut Vec<String>) {
        let mut add = |list: Vec<String>, what: &str| {
            if !list.is_empty() {
                let shown: Vec<&str> = list.iter().take(EXAMPLES).map(String::as_str).collect();
                violations.push(format!(
                    "invariant 7: {} {what}: {}",
                    list.len(),
                    shown.join(", ")
                ));
            }
        };
        add(
            self.paid_without_one_debit,
            "paid orders without exactly one debit of their amount",
        );
        add(self.kept_money, "orders that are not paid but keep money");
        add(
            self.unknown,
            "ledger orders the order database does not know",
        );
    }
}
