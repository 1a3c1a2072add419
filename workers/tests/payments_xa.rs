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
use payments::{
    pay_through_a_wallet_outage, pay_twice_at_once, payments_for, recover_all, Ctx, FaultRun, PRICE,
};
use seckill_contracts::config::PaymentMode;
use seckill_workers::payments::fence::EndOutcome;
use seckill_workers::payments::log::new_tx_id;
use seckill_workers::payments::log::PayTx;
use seckill_workers::payments::order_branch::OrderGroupBranch;
use seckill_workers::payments::wallet_client::{WalletCallError, WalletClient};
use seckill_workers::payments::{order_branch, xa, xa_branch, PayResult};
use seckill_workers::statuses::TxState;
use seckill_workers::wallet::accounts;
use seckill_workers::wallet::routes::{PrepareRequest, TryRequest};
use seckill_workers::wallet::xa::{Debit, PrepareOutcome};

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

/// A group's wallet prepare of `items` (user, order, amount), each its
/// own payment.
fn group_prepare(group: &str, items: &[(u64, &str, i64)]) -> PrepareRequest {
    PrepareRequest {
        group_id: group.to_string(),
        items: items
            .iter()
            .map(|&(user_id, order, amount_cents)| TryRequest {
                tx_id: new_tx_id(),
                user_id,
                order_id: order.to_string(),
                amount_cents,
            })
            .collect(),
    }
}

/// A payment of `order` by `user`, as the log would hold it.
fn payment(c: &Ctx, user: u64, order: &str) -> PayTx {
    PayTx {
        tx_id: new_tx_id(),
        order_id: order.to_string(),
        user_id: user,
        sale_id: c.sale,
        amount_cents: PRICE,
        mode: PaymentMode::Xa,
        state: TxState::Started,
        xa_group: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_at_once_share_groups_and_each_gets_its_own_answer() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(200, PaymentMode::Xa).await;
    let users: Vec<u64> = (1..=200).collect();
    let ids = c.orders(&users).await;
    // Every tenth buyer cannot afford the order; buyer 1 pays twice.
    let (poor, rich): (Vec<u64>, Vec<u64>) = users.iter().partition(|u| u.is_multiple_of(10));
    c.wallet.credit(&rich, 10_000).await;
    c.wallet.credit(&poor, PRICE - 1).await;
    // Buyer 2's order is held by a branch elsewhere (a payment of another
    // api, in doubt): only that payment is turned away, its group goes on.
    let elsewhere = [payment(&c, 2, &ids[1])];
    let (held, _) = OrderGroupBranch::lock(&c.db, &new_tx_id(), &elsewhere)
        .await
        .unwrap();
    let payments = users
        .iter()
        .chain([&1])
        .map(|&u| c.pay(u, &ids[(u - 1) as usize]));
    let answers =
        tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(payments))
            .await
            .expect("a held order stalled the payments");
    assert_eq!(answers[1], PayResult::InProgress);
    held.give_up().await.unwrap();
    assert!(matches!(c.pay(2, &ids[1]).await, PayResult::Paid(_)));

    for (i, answer) in answers.iter().take(users.len()).enumerate() {
        let user = users[i];
        match answer {
            PayResult::InsufficientFunds if user.is_multiple_of(10) => {}
            PayResult::Paid(_) if !user.is_multiple_of(10) => {}
            // Buyer 1's other payment paid first; buyer 2's was held.
            PayResult::AlreadyPaid | PayResult::InProgress if user <= 2 => {}
            other => panic!("buyer {user}: {other:?}"),
        }
        let expected = if user.is_multiple_of(10) {
            "unpaid"
        } else {
            "paid"
        };
        assert_eq!(c.status(&ids[i]).await, expected, "buyer {user}");
    }
    assert!(
        matches!(
            answers[users.len()],
            PayResult::Paid(_) | PayResult::AlreadyPaid | PayResult::InProgress
        ),
        "{:?}",
        answers[users.len()]
    );
    assert_eq!(c.balance(1).await, (10_000 - PRICE, 0));
    assert_eq!(c.balance(10).await, (PRICE - 1, 0));
    // The 202 payments ran in far fewer XA transactions than payments.
    let (groups, logged): (i64, i64) =
        sqlx::query_as("SELECT COUNT(DISTINCT xa_group), COUNT(*) FROM pay_transactions")
            .fetch_one(&c.db)
            .await
            .unwrap();
    assert_eq!(logged, 202);
    assert!(groups < 100, "{groups} groups for {logged} payments");
    c.assert_audits_clean().await;
    println!("xa: {logged} payments at once in {groups} groups, audits clean");
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_branch_ends_once_whatever_order_phase_two_arrives_in() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Xa).await;
    c.wallet.credit(&[1, 2], 10_000).await;
    let ids = c.orders(&[1, 2]).await;
    let wallet = WalletClient::new(c.config());

    // A rollback with nothing prepared is empty and changes nothing.
    let group = new_tx_id();
    assert_eq!(
        wallet.xa_rollback(&group).await.unwrap(),
        EndOutcome::EmptyRollback
    );
    // Prepared: the debits are invisible until committed, and a second
    // prepare of the same group is a repeat (its content unknown to it).
    // Buyer 1's second debit is more than what the first left.
    let request = group_prepare(
        &group,
        &[
            (1, &ids[0], PRICE),
            (2, &ids[1], PRICE),
            (1, &ids[0], 10_000),
        ],
    );
    let prepared = wallet.xa_prepare(&request).await.unwrap();
    assert_eq!(prepared.outcome, PrepareOutcome::Prepared);
    assert_eq!(
        prepared.debits,
        [Debit::Debited, Debit::Debited, Debit::InsufficientFunds]
    );
    let repeat = wallet.xa_prepare(&request).await.unwrap();
    assert_eq!(repeat.outcome, PrepareOutcome::Repeat);
    assert_eq!(c.balance(1).await, (10_000, 0));
    assert!(wallet.xa_prepared().await.unwrap().contains(&group));
    // Committed once; again is a repeat; a rollback after it is refused.
    assert_eq!(wallet.xa_commit(&group).await.unwrap(), EndOutcome::Done);
    assert_eq!(wallet.xa_commit(&group).await.unwrap(), EndOutcome::Repeat);
    assert_eq!(
        wallet.xa_rollback(&group).await.unwrap(),
        EndOutcome::Refused
    );
    assert_eq!(c.balance(1).await, (10_000 - PRICE, 0));
    assert_eq!(c.balance(2).await, (10_000 - PRICE, 0));
    let ledger = accounts::statement(&c.wallet.db, 1).await.unwrap().ledger;
    assert_eq!(ledger[0].balance_after_cents, 10_000 - PRICE);
    // A wallet another group's branch holds is skipped (busy), whatever
    // else the group debits; a buyer without a wallet has no money.
    let holding = new_tx_id();
    let held = wallet
        .xa_prepare(&group_prepare(&holding, &[(2, &ids[1], 1)]))
        .await
        .unwrap();
    assert_eq!(held.debits, [Debit::Debited]);
    let busy = new_tx_id();
    let other = wallet
        .xa_prepare(&group_prepare(
            &busy,
            &[(2, &ids[1], 1), (1, &ids[0], 1), (99, &ids[0], 1)],
        ))
        .await
        .unwrap();
    assert_eq!(
        other.debits,
        [Debit::Busy, Debit::Debited, Debit::InsufficientFunds]
    );
    for group in [&busy, &holding] {
        assert_eq!(wallet.xa_rollback(group).await.unwrap(), EndOutcome::Done);
    }
    assert_eq!(c.balance(2).await, (10_000 - PRICE, 0));
    // A commit of something never prepared is refused.
    assert_eq!(
        wallet.xa_commit(&new_tx_id()).await.unwrap(),
        EndOutcome::Refused
    );

    // The order's branch: the payable orders locked, one payment per
    // order; prepared, the rows stay unpaid to everyone else, and a second
    // group cannot lock them meanwhile.
    let first = [payment(&c, 1, &ids[0]), payment(&c, 1, &ids[0])];
    let group = new_tx_id();
    let (branch, can_go) = OrderGroupBranch::lock(&c.db, &group, &first).await.unwrap();
    assert_eq!(can_go, [true, false], "one payment per order in a group");
    let branch = branch.prepare(&[&ids[0]]).await.unwrap();
    assert_eq!(c.status(&ids[0]).await, "unpaid");
    // A second group skips the row the first holds, without waiting...
    let lone = [payment(&c, 1, &ids[0])];
    let (second, can_go) = OrderGroupBranch::lock(&c.db, &new_tx_id(), &lone)
        .await
        .unwrap();
    assert_eq!(can_go, [false], "a held order is skipped, not waited for");
    second.give_up().await.unwrap();
    branch.rollback().await.unwrap();
    // ...and takes it once the first let go.
    let (third, can_go) = OrderGroupBranch::lock(&c.db, &new_tx_id(), &lone)
        .await
        .unwrap();
    assert_eq!(can_go, [true]);
    third.give_up().await.unwrap();
    assert_eq!(c.status(&ids[0]).await, "unpaid");
    // Someone else's order, or a made-up one, or a SQL-looking id: not
    // payable, and nothing stays prepared.
    let odd = [
        payment(&c, 2, &ids[0]),
        payment(&c, 1, &uuid::Uuid::new_v4().to_string()),
        payment(&c, 1, "00000000-0000-0000-0000-00000000000'"),
    ];
    let group = new_tx_id();
    let (branch, can_go) = OrderGroupBranch::lock(&c.db, &group, &odd).await.unwrap();
    assert_eq!(can_go, [false, false, false]);
    branch.give_up().await.unwrap();
    let mut conn = c.db.acquire().await.unwrap();
    let left = xa_branch::prepared(&mut conn, order_branch::BRANCH)
        .await
        .unwrap();
    assert!(!left.contains(&group), "a branch stayed prepared");
    drop(conn);
    assert_eq!(c.status(&ids[0]).await, "unpaid");
    // A group whose debits the balances cannot cover keeps no branch.
    let poor = new_tx_id();
    let refused = wallet
        .xa_prepare(&group_prepare(&poor, &[(1, &ids[0], 10_000_000)]))
        .await
        .unwrap();
    assert_eq!(refused.debits, [Debit::InsufficientFunds]);
    assert!(!wallet.xa_prepared().await.unwrap().contains(&poor));
    assert_eq!(c.balance(1).await, (10_000 - PRICE, 0));

    // Bad input to the wallet's internal routes changes nothing.
    let mut bad_group = group_prepare(&new_tx_id(), &[(1, &ids[0], PRICE)]);
    bad_group.group_id = "'; XA COMMIT 'x".into();
    let mut bad_tx = group_prepare(&new_tx_id(), &[(1, &ids[0], PRICE)]);
    bad_tx.items[0].tx_id = "' OR 1=1 --".into();
    let bad_order = group_prepare(
        &new_tx_id(),
        &[
            (1, &ids[0], PRICE),
            (1, "00000000-0000-0000-0000-000000000') ", PRICE),
        ],
    );
    let empty = group_prepare(&new_tx_id(), &[]);
    let over = c.config().payment.group_commit_max as usize + 1;
    let too_many = group_prepare(&new_tx_id(), &vec![(1, ids[0].as_str(), 1); over]);
    for bad in [bad_group, bad_tx, bad_order, empty, too_many] {
        assert!(
            matches!(
                wallet.xa_prepare(&bad).await,
                Err(WalletCallError::Refused { status: 400, .. })
            ),
            "{bad:?}"
        );
    }
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

    let group = new_tx_id();
    let prepared = first
        .xa_prepare(&group_prepare(&group, &[(1, &ids[0], PRICE)]))
        .await
        .unwrap();
    assert_eq!(prepared.debits, [Debit::Debited]);
    // The first instance holds the branch: the second cannot end it yet.
    assert!(matches!(
        second.xa_rollback(&group).await,
        Err(WalletCallError::Unavailable(_))
    ));
    // After wallet.xa_hold_ms (1 s here) the first lets it go.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let ended = loop {
        match second.xa_rollback(&group).await {
            Ok(outcome) => break outcome,
            Err(WalletCallError::Unavailable(_)) => {
                assert!(tokio::time::Instant::now() < deadline, "never let go");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(ended, EndOutcome::Done);
    assert!(!second.xa_prepared().await.unwrap().contains(&group));
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

/// Cuts for a group of several payments, one of them poor, and where
/// the rich ones' orders end.
const GROUP_CUTS: &[(&str, &str)] = &[
    ("xa.after_prepare_wallet", "unpaid"),
    ("xa.after_prepare_order", "unpaid"),
    ("xa.after_decide", "paid"),
    ("xa.after_commit_wallet", "paid"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_cut_short_ends_every_payment_of_it_consistent() {
    let scenario = fail::FailScenario::setup();
    let c = Ctx::start(40, PaymentMode::Xa).await;
    // One group at a time, so payments queued behind a busy one share
    // the next group.
    let mut config = c.config().clone();
    config.payment.group_commits_in_flight = 1;
    let api = std::sync::Arc::new(payments_for(&config, &c.db));
    for (case, (point, rich_end)) in GROUP_CUTS.iter().enumerate() {
        // Buyers: a first one alone, then two rich and one poor together.
        let users: Vec<u64> = (1..=4).map(|i| case as u64 * 4 + i).collect();
        let ids = c.orders(&users).await;
        c.wallet.credit(&users[..3], 10_000).await;
        c.wallet.credit(&users[3..], PRICE / 2).await;
        fail::cfg(*point, "return").unwrap();
        // The log table locked: the first group waits on its INSERT
        // while the other three queue behind it.
        let mut lock = c.db.acquire().await.unwrap();
        sqlx::query("LOCK TABLES pay_transactions WRITE")
            .execute(&mut *lock)
            .await
            .unwrap();
        let pay = |i: usize| {
            let (api, redis, order, user) =
                (api.clone(), c.redis.clone(), ids[i].clone(), users[i]);
            tokio::spawn(async move { api.pay(&mut redis.clone(), user, &order).await })
        };
        let first = pay(0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let together: Vec<_> = (1..4).map(pay).collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        sqlx::query("UNLOCK TABLES")
            .execute(&mut *lock)
            .await
            .unwrap();
        drop(lock);
        for answer in std::iter::once(first).chain(together) {
            let answer = answer.await.unwrap();
            assert!(!matches!(answer, Ok(PayResult::Paid(_))) || *rich_end == "paid");
        }
        fail::remove(point);
        let groups: i64 = sqlx::query_scalar(
            "SELECT COUNT(DISTINCT xa_group) FROM pay_transactions WHERE order_id IN (?, ?, ?)",
        )
        .bind(&ids[1])
        .bind(&ids[2])
        .bind(&ids[3])
        .fetch_one(&c.db)
        .await
        .unwrap();
        assert_eq!(
            groups, 1,
            "{point}: the three queued payments share a group"
        );
        recover_all(&payments_for(c.config(), &c.db)).await;
        for (i, user) in users.iter().enumerate() {
            let (end, start) = if i < 3 {
                (*rich_end, 10_000)
            } else {
                ("unpaid", PRICE / 2)
            };
            assert_eq!(
                c.wait_status(&ids[i], end).await,
                end,
                "{point}: buyer {user}"
            );
            let spent = if end == "paid" { PRICE } else { 0 };
            assert_eq!(
                c.balance(*user).await,
                (start - spent, 0),
                "{point}: buyer {user}"
            );
        }
        c.assert_audits_clean().await;
    }
    scenario.teardown();
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_that_lands_after_its_abort_is_rolled_back_by_recovery() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Xa).await;
    c.wallet.credit(&[1], 10_000).await;
    let ids = c.orders(&[1]).await;
    // The coordinator dies once its group is logged; recovery aborts the
    // group (nothing of the wallet's yet)...
    fail::cfg("xa.after_begin", "return").unwrap();
    assert!(c
        .payments
        .pay(&mut c.redis.clone(), 1, &ids[0])
        .await
        .is_err());
    fail::remove("xa.after_begin");
    let report = recover_all(&c.payments).await;
    assert_eq!(report.aborted, 1, "{report:?}");
    let group: String = sqlx::query_scalar("SELECT xa_group FROM pay_transactions")
        .fetch_one(&c.db)
        .await
        .unwrap();
    // ...then its wallet prepare, long delayed on the way, lands.
    let wallet = WalletClient::new(c.config());
    let late = wallet
        .xa_prepare(&group_prepare(&group, &[(1, &ids[0], PRICE)]))
        .await
        .unwrap();
    assert_eq!(late.debits, [Debit::Debited]);
    // The next pass finds the branch in XA RECOVER and rolls it back.
    let report = recover_all(&c.payments).await;
    assert_eq!(report.orphans_ended, 1, "{report:?}");
    assert!(!wallet.xa_prepared().await.unwrap().contains(&group));
    let mut conn = c.db.acquire().await.unwrap();
    assert!(!xa_branch::prepared(&mut conn, order_branch::BRANCH)
        .await
        .unwrap()
        .contains(&group));
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
