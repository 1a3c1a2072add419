//! XA payments (two-phase commit over MariaDB XA branches in the order
//! database and the wallet's) against the real MariaDB and Redis, with the
//! wallet service in-process: paying, refusals, each branch's phase two
//! repeated or reordered, a branch a wallet instance holds let go to
//! another, a fault injected at every step followed by recovery, and the
//! wallet down mid-run with its prepared branches. Every test ends with
//! `audit --payments` clean (SPEC invariant 7, no XA branch of ours left
//! prepared) and the sale audit clean.
//!
//! Fail points are process-wide and the wallet runs in this process: every
//! test holds the fail-point lock (`FailScenario`).

#[path = "payments_support.rs"]
mod payments;

use std::time::Duration;

use payments::support::InProcessWallet;
use payments::{pay_through_a_wallet_outage, pay_twice_at_once, recover_all, Ctx, FaultRun, PRICE};
use seckill_contracts::config::PaymentMode;
use seckill_workers::payments::fence::EndOutcome;
use seckill_workers::payments::log::new_tx_id;
use seckill_workers::payments::wallet_client::{WalletCallError, WalletClient};
use seckill_workers::payments::{order_branch, xa, xa_branch, PayResult};
use seckill_workers::wallet::accounts;
use seckill_workers::wallet::routes::PrepareRequest;
use seckill_workers::wallet::xa::PrepareOutcome;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_debits_once_in_two_phases_and_marks_the_order_paid() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Xa).await;
    c.wallet.credit(&[1], 10_000).await;
    let ids = c.orders(&[1]).await;

    let paid = match c.pay(1, &ids[0]).await {
        PayResult::Paid(o) => o,
        other => panic!("{other:?}"),
    };
    assert_eq!(paid.status.as_str(), "paid");
    assert_eq!(c.balance(1).await, (10_000 - PRICE, 0));
    let ledger = accounts::statement(&c.wallet.db, 1).await.unwrap().ledger;
    let kinds: Vec<&str> = ledger.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["debit", "credit"], "no freeze in XA, newest first");
    assert_eq!(ledger[0].order_id.as_deref(), Some(ids[0].as_str()));

    assert_eq!(c.pay(1, &ids[0]).await, PayResult::AlreadyPaid);
    assert_eq!(c.pay(2, &ids[0]).await, PayResult::NotFound);
    assert_eq!(c.pay(1, "' OR 1=1 --").await, PayResult::NotFound);
    assert_eq!(c.balance(1).await, (10_000 - PRICE, 0));
    c.assert_audits_clean().await;
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_enough_money_is_refused_and_nothing_stays_prepared() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Xa).await;
    c.wallet.credit(&[1], PRICE - 1).await;
    let ids = c.orders(&[1, 2]).await;

    assert_eq!(c.pay(1, &ids[0]).await, PayResult::InsufficientFunds);
    assert_eq!(c.status(&ids[0]).await, "unpaid");
    assert_eq!(c.balance(1).await, (PRICE - 1, 0));
    assert_eq!(c.pay(2, &ids[1]).await, PayResult::InsufficientFunds);

    c.wallet.credit(&[1], 1).await;
    assert!(matches!(c.pay(1, &ids[0]).await, PayResult::Paid(_)));
    assert_eq!(c.balance(1).await, (0, 0));
    c.assert_audits_clean().await;
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_paying_twice_at_once_is_charged_once() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Xa).await;
    pay_twice_at_once(&c).await;
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_branch_ends_once_whatever_order_phase_two_arrives_in() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Xa).await;
    c.wallet.credit(&[1], 10_000).await;
    let ids = c.orders(&[1]).await;
    let wallet = WalletClient::new(c.config());
    let prepare = |tx: &str| PrepareRequest {
        tx_id: tx.to_string(),
        user_id: 1,
        order_id: ids[0].clone(),
        amount_cents: PRICE,
    };

    // A rollback with nothing prepared is empty and changes nothing.
    let tx = new_tx_id();
    assert_eq!(
        wallet.xa_rollback(&tx).await.unwrap(),
        EndOutcome::EmptyRollback
    );
    // Prepared: the debit is invisible until committed, and a second
    // prepare of the same branch is a repeat.
    assert_eq!(
        wallet.xa_prepare(&prepare(&tx)).await.unwrap(),
        PrepareOutcome::Prepared
    );
    assert_eq!(
        wallet.xa_prepare(&prepare(&tx)).await.unwrap(),
        PrepareOutcome::Repeat
    );
    assert_eq!(c.balance(1).await, (10_000, 0));
    assert!(wallet.xa_prepared().await.unwrap().contains(&tx));
    // Committed once; again is a repeat; a rollback after it is refused.
    assert_eq!(wallet.xa_commit(&tx).await.unwrap(), EndOutcome::Done);
    assert_eq!(wallet.xa_commit(&tx).await.unwrap(), EndOutcome::Repeat);
    assert_eq!(wallet.xa_rollback(&tx).await.unwrap(), EndOutcome::Refused);
    assert_eq!(c.balance(1).await, (10_000 - PRICE, 0));
    // A commit of something never prepared is refused.
    assert_eq!(
        wallet.xa_commit(&new_tx_id()).await.unwrap(),
        EndOutcome::Refused
    );

    // The order's branch: prepared, the row is locked and still unpaid to
    // everyone else; a second transaction cannot prepare it meanwhile.
    let tx = new_tx_id();
    let branch = order_branch::xa_prepare(&c.db, &tx, 1, &ids[0])
        .await
        .unwrap()
        .expect("prepared");
    assert_eq!(c.status(&ids[0]).await, "unpaid");
    // A second transaction's prepare waits on the row lock, and prepares
    // once the first branch is rolled back.
    let second = {
        let db = c.db.clone();
        let order = ids[0].clone();
        tokio::spawn(async move { order_branch::xa_prepare(&db, &new_tx_id(), 1, &order).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "a second prepare waits on the row lock"
    );
    branch.rollback().await.unwrap();
    let second = second
        .await
        .unwrap()
        .unwrap()
        .expect("prepared after the first let go");
    second.rollback().await.unwrap();
    assert_eq!(c.status(&ids[0]).await, "unpaid");
    // Someone else's order, or a made-up one, or no order id at all:
    // nothing prepared, not even an empty branch.
    let mut conn = c.db.acquire().await.unwrap();
    for (user, order) in [
        (2, ids[0].clone()),
        (1, uuid::Uuid::new_v4().to_string()),
        (1, "00000000-0000-0000-0000-00000000000'".to_string()),
    ] {
        let tx = new_tx_id();
        assert!(order_branch::xa_prepare(&c.db, &tx, user, &order)
            .await
            .unwrap()
            .is_none());
        let left = xa_branch::prepared(&mut conn, order_branch::BRANCH)
            .await
            .unwrap();
        assert!(!left.contains(&tx), "{order}: a branch stayed prepared");
    }
    drop(conn);
    assert_eq!(c.status(&ids[0]).await, "unpaid");
    // The wallet refuses a debit the balance cannot cover, and keeps no
    // branch of it.
    let poor = new_tx_id();
    assert_eq!(
        wallet
            .xa_prepare(&PrepareRequest {
                amount_cents: 10_000_000,
                ..prepare(&poor)
            })
            .await
            .unwrap(),
        PrepareOutcome::InsufficientFunds
    );
    assert!(!wallet.xa_prepared().await.unwrap().contains(&poor));
    assert_eq!(c.balance(1).await, (10_000 - PRICE, 0));

    // Bad input to the wallet's internal routes changes nothing.
    let bad = PrepareRequest {
        tx_id: "'; XA COMMIT 'x".into(),
        ..prepare(&new_tx_id())
    };
    assert!(matches!(
        wallet.xa_prepare(&bad).await,
        Err(WalletCallError::Refused { status: 400, .. })
    ));
    let bad_order = PrepareRequest {
        order_id: "00000000-0000-0000-0000-000000000') ".into(),
        ..prepare(&new_tx_id())
    };
    assert!(matches!(
        wallet.xa_prepare(&bad_order).await,
        Err(WalletCallError::Refused { status: 400, .. })
    ));
    assert_eq!(c.balance(1).await, (10_000 - PRICE, 0));
    // The test's own transactions were never logged: the sale audit is
    // what must hold.
    c.assert_sale_audit_clean().await;
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_one_wallet_holds_is_let_go_and_another_ends_it() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Xa).await;
    c.wallet.credit(&[1], 10_000).await;
    let ids = c.orders(&[1]).await;
    let other = InProcessWallet::start(c.config()).await;
    let first = WalletClient::new(c.config());
    let second = WalletClient::new(&other.config);

    let tx = new_tx_id();
    let prepared = first
        .xa_prepare(&PrepareRequest {
            tx_id: tx.clone(),
            user_id: 1,
            order_id: ids[0].clone(),
            amount_cents: PRICE,
        })
        .await
        .unwrap();
    assert_eq!(prepared, PrepareOutcome::Prepared);
    // The first instance holds the branch: the second cannot end it yet.
    assert!(matches!(
        second.xa_rollback(&tx).await,
        Err(WalletCallError::Unavailable(_))
    ));
    // After wallet.xa_hold_ms (1 s here) the first lets it go.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let ended = loop {
        match second.xa_rollback(&tx).await {
            Ok(outcome) => break outcome,
            Err(WalletCallError::Unavailable(_)) => {
                assert!(tokio::time::Instant::now() < deadline, "never let go");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(ended, EndOutcome::Done);
    assert!(!second.xa_prepared().await.unwrap().contains(&tx));
    assert_eq!(c.balance(1).await, (10_000, 0));
    other.stop().await;
    c.assert_sale_audit_clean().await;
    c.finish().await;
}

/// The fail points on the commit path, and where the order ends: paid if
/// the cut came after the decision, unpaid before it.
const COMMIT_PATH: &[(&str, &str)] = &[
    ("xa.after_begin", "unpaid"),
    ("xa.after_prepare_order", "unpaid"),
    ("xa.after_prepare_wallet", "unpaid"),
    ("xa.after_decide", "paid"),
    ("xa.after_commit_wallet", "paid"),
    ("xa.after_commit_order", "paid"),
    // The wallet acted but its answer was lost.
    ("wallet.xa.before_prepare", "unpaid"),
    ("wallet.xa.after_prepare", "unpaid"),
    ("wallet.xa.after_end", "paid"),
];

/// Fail points on the abort path (the buyer cannot afford the order).
const ABORT_PATH: &[&str] = &[
    "xa.after_decide_abort",
    "xa.after_rollback_wallet",
    "xa.after_rollback_order",
    "wallet.xa.after_end",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_at_every_step_ends_consistent_after_recovery() {
    let scenario = fail::FailScenario::setup();
    let c = Ctx::start(40, PaymentMode::Xa).await;
    FaultRun {
        commit_path: COMMIT_PATH,
        abort_path: ABORT_PATH,
        fail_points: xa::FAIL_POINTS,
        fault_lingers: Duration::ZERO,
        one_pass: false,
    }
    .run(&c)
    .await;
    scenario.teardown();
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_that_lands_after_its_abort_is_rolled_back_by_recovery() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Xa).await;
    c.wallet.credit(&[1], 10_000).await;
    let ids = c.orders(&[1]).await;
    // The coordinator dies after its order branch is prepared; recovery
    // aborts the transaction (nothing of the wallet's yet)...
    fail::cfg("xa.after_prepare_order", "return").unwrap();
    assert!(c
        .payments
        .pay(&mut c.redis.clone(), 1, &ids[0])
        .await
        .is_err());
    fail::remove("xa.after_prepare_order");
    let report = recover_all(&c.payments).await;
    assert_eq!(report.aborted, 1, "{report:?}");
    let tx_id: String = sqlx::query_scalar("SELECT tx_id FROM pay_transactions")
        .fetch_one(&c.db)
        .await
        .unwrap();
    // ...then its wallet prepare, long delayed on the way, lands.
    let wallet = WalletClient::new(c.config());
    let late = wallet
        .xa_prepare(&PrepareRequest {
            tx_id: tx_id.clone(),
            user_id: 1,
            order_id: ids[0].clone(),
            amount_cents: PRICE,
        })
        .await
        .unwrap();
    assert_eq!(late, PrepareOutcome::Prepared);
    // The next pass finds the branch in XA RECOVER and rolls it back.
    let report = recover_all(&c.payments).await;
    assert_eq!(report.orphans_ended, 1, "{report:?}");
    assert!(!wallet.xa_prepared().await.unwrap().contains(&tx_id));
    let mut conn = c.db.acquire().await.unwrap();
    assert!(!xa_branch::prepared(&mut conn, order_branch::BRANCH)
        .await
        .unwrap()
        .contains(&tx_id));
    drop(conn);
    assert_eq!(c.balance(1).await, (10_000, 0));
    assert_eq!(c.status(&ids[0]).await, "unpaid");
    c.assert_audits_clean().await;
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_wallet_down_for_5_s_payments_are_refused_and_end_consistent() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(60, PaymentMode::Xa).await;
    let (c, answers, ids) = pay_through_a_wallet_outage(c, 60).await;

    let refused = answers
        .iter()
        .filter(|r| **r == PayResult::Unavailable)
        .count();
    let done = answers
        .iter()
        .filter(|r| matches!(r, PayResult::Paid(_) | PayResult::Settling(_)))
        .count();
    assert!(refused > 0, "the wallet was never seen down: {answers:?}");
    assert!(done > 0);
    assert_eq!(refused + done, answers.len(), "{answers:?}");
    recover_all(&c.payments).await;
    for (i, r) in answers.iter().enumerate() {
        let expected = if matches!(r, PayResult::Unavailable) {
            "unpaid"
        } else {
            "paid"
        };
        assert_eq!(c.status(&ids[i]).await, expected);
    }
    c.assert_audits_clean().await;
    println!("xa, wallet down 5 s: {done} paid, {refused} refused (503), audits clean");
    c.finish().await;
}
