//! TCC payments against the real MariaDB (the order database and the
//! wallet's own) and Redis, with the wallet service in-process: paying,
//! refusals, the fences on both branches, a fault injected at every step
//! of the coordinator and the wallet followed by recovery, the wallet down
//! mid-run. Every test ends with `audit --payments` clean (SPEC invariant
//! 7) and the sale audit clean.
//!
//! Fail points are process-wide, and the wallet runs in this process: every
//! test holds the fail-point lock (`FailScenario`), so none meets a fault
//! configured for another.

#[path = "payments_support.rs"]
mod payments;

use std::time::Duration;

use payments::support::count;
use payments::{
    counted, pay_at_once_in_batches, pay_through_a_wallet_outage, pay_twice_at_once,
    session_status, Ctx, FaultRun, PRICE, SET_STATEMENTS,
};
use seckill_contracts::config::PaymentMode;
use seckill_workers::payments::fence::EndOutcome;
use seckill_workers::payments::log::new_tx_id;
use seckill_workers::payments::recovery::recover_once;
use seckill_workers::payments::wallet_client::WalletClient;
use seckill_workers::payments::{order_branch, tcc, PayResult};
use seckill_workers::wallet::accounts;
use seckill_workers::wallet::routes::TryRequest;
use seckill_workers::wallet::tcc::TryOutcome;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_freezes_then_debits_once_and_marks_the_order_paid() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Tcc).await;
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
    assert_eq!(kinds, ["debit", "freeze", "credit"], "newest first");
    assert_eq!(ledger[0].order_id.as_deref(), Some(ids[0].as_str()));

    // Again (another key): nothing moves.
    assert_eq!(c.pay(1, &ids[0]).await, PayResult::AlreadyPaid);
    // Someone else's order is not found; a made-up id too.
    assert_eq!(c.pay(2, &ids[0]).await, PayResult::NotFound);
    assert_eq!(c.pay(1, "' OR 1=1 --").await, PayResult::NotFound);
    assert_eq!(c.balance(1).await, (10_000 - PRICE, 0));
    c.assert_audits_clean().await;
    c.finish().await;
}

/// A wallet fence written before fences kept their order (the column is
/// NULL, as on rows of an older wallet): recovery's Confirm still debits
/// exactly that order, found through the Try's ledger row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_without_its_order_still_confirms_the_right_order() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Tcc).await;
    c.wallet.credit(&[1], 10_000).await;
    let ids = c.orders(&[1]).await;
    fail::cfg("tcc.after_decide", "return").unwrap();
    let cut = c.payments.pay(&mut c.redis.clone(), 1, &ids[0]).await;
    fail::remove("tcc.after_decide");
    assert!(cut.is_err(), "{cut:?}");
    let older = sqlx::query("UPDATE tcc_fences SET order_id = NULL WHERE branch = 'wallet'")
        .execute(&c.wallet.db)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(older, 1);

    recover_once(&c.payments, Duration::ZERO)
        .await
        .expect("recovery");
    assert_eq!(c.balance(1).await, (10_000 - PRICE, 0));
    let ledger = accounts::statement(&c.wallet.db, 1).await.unwrap().ledger;
    assert_eq!(ledger[0].kind.as_str(), "debit");
    assert_eq!(ledger[0].order_id.as_deref(), Some(ids[0].as_str()));
    c.assert_audits_clean().await;
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_enough_money_is_refused_and_moves_nothing() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Tcc).await;
    c.wallet.credit(&[1], PRICE - 1).await;
    let ids = c.orders(&[1, 2]).await;

    assert_eq!(c.pay(1, &ids[0]).await, PayResult::InsufficientFunds);
    assert_eq!(c.status(&ids[0]).await, "unpaid");
    assert_eq!(c.balance(1).await, (PRICE - 1, 0));
    // A buyer who never had money: an empty wallet, refused the same way.
    assert_eq!(c.pay(2, &ids[1]).await, PayResult::InsufficientFunds);

    // Topped up, the same order pays.
    c.wallet.credit(&[1], 1).await;
    assert!(matches!(c.pay(1, &ids[0]).await, PayResult::Paid(_)));
    assert_eq!(c.balance(1).await, (0, 0));
    c.assert_audits_clean().await;
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_paying_twice_at_once_is_charged_once() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Tcc).await;
    pay_twice_at_once(&c).await;
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fence_rolls_back_empty_refuses_a_suspended_try_and_ignores_repeats() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Tcc).await;
    c.wallet.credit(&[1], 10_000).await;
    let ids = c.orders(&[1]).await;
    let wallet = WalletClient::new(c.config());
    let try_wallet = |tx: &str| TryRequest {
        tx_id: tx.to_string(),
        user_id: 1,
        order_id: ids[0].clone(),
        amount_cents: PRICE,
    };

    // Cancel before Try: an empty rollback on both branches...
    let tx = new_tx_id();
    assert_eq!(
        wallet.tcc_cancel(&tx).await.unwrap(),
        EndOutcome::EmptyRollback
    );
    assert_eq!(
        order_branch::cancel(&c.db, &tx).await.unwrap(),
        EndOutcome::EmptyRollback
    );
    // ...then the late Try is refused (suspension): nothing held.
    assert_eq!(
        wallet.tcc_try(&try_wallet(&tx)).await.unwrap(),
        TryOutcome::Suspended
    );
    assert_eq!(
        order_branch::hold(&c.db, &tx, 1, &ids[0]).await.unwrap(),
        order_branch::HoldOutcome::Refused
    );
    assert_eq!(c.balance(1).await, (10_000, 0));
    assert_eq!(c.status(&ids[0]).await, "unpaid");
    // A repeated Cancel does nothing; a Confirm of a cancelled branch is refused.
    assert_eq!(wallet.tcc_cancel(&tx).await.unwrap(), EndOutcome::Repeat);
    assert_eq!(wallet.tcc_confirm(&tx).await.unwrap(), EndOutcome::Refused);

    // Try, Try again, Confirm, Confirm again, then a Cancel: one freeze,
    // one debit, and the Cancel is refused.
    let tx = new_tx_id();
    assert_eq!(
        wallet.tcc_try(&try_wallet(&tx)).await.unwrap(),
        TryOutcome::Frozen
    );
    assert_eq!(
        wallet.tcc_try(&try_wallet(&tx)).await.unwrap(),
        TryOutcome::Repeat
    );
    assert_eq!(c.balance(1).await, (10_000 - PRICE, PRICE));
    assert_eq!(wallet.tcc_confirm(&tx).await.unwrap(), EndOutcome::Done);
    assert_eq!(wallet.tcc_confirm(&tx).await.unwrap(), EndOutcome::Repeat);
    assert_eq!(wallet.tcc_cancel(&tx).await.unwrap(), EndOutcome::Refused);
    assert_eq!(c.balance(1).await, (10_000 - PRICE, 0));
    let debits = count(
        &c.wallet.db,
        &format!("SELECT COUNT(*) FROM wallet_ledger WHERE tx_id = '{tx}' AND kind = 'debit'"),
    )
    .await;
    assert_eq!(debits, 1);
    // A Confirm with no Try at all is refused.
    assert_eq!(
        wallet.tcc_confirm(&new_tx_id()).await.unwrap(),
        EndOutcome::Refused
    );
    // The order's branch the same way.
    let tx = new_tx_id();
    let held = order_branch::hold(&c.db, &tx, 1, &ids[0]).await.unwrap();
    assert_eq!(held, order_branch::HoldOutcome::Held);
    assert_eq!(c.status(&ids[0]).await, "paying");
    let again = order_branch::hold(&c.db, &tx, 1, &ids[0]).await.unwrap();
    assert_eq!(again, order_branch::HoldOutcome::Repeat);
    // Another transaction cannot hold the same order.
    let other = order_branch::hold(&c.db, &new_tx_id(), 1, &ids[0])
        .await
        .unwrap();
    assert_eq!(other, order_branch::HoldOutcome::Refused);
    assert_eq!(
        order_branch::cancel(&c.db, &tx).await.unwrap(),
        EndOutcome::Done
    );
    assert_eq!(
        order_branch::cancel(&c.db, &tx).await.unwrap(),
        EndOutcome::Repeat
    );
    assert_eq!(
        order_branch::confirm(&c.db, &tx).await.unwrap(),
        EndOutcome::Refused
    );
    assert_eq!(c.status(&ids[0]).await, "unpaid");

    // Bad input to the wallet's internal routes changes nothing.
    let bad = TryRequest {
        tx_id: "'; DROP TABLE wallets; --".into(),
        ..try_wallet(&new_tx_id())
    };
    assert!(wallet.tcc_try(&bad).await.is_err());
    // The money-moving test transactions above were never logged, so the
    // payments audit would count the test's own debit as unexplained: the
    // sale audit is what must hold here.
    c.assert_sale_audit_clean().await;
    c.finish().await;
}

/// The coordinator's fail points on the commit path: an order ends paid
/// if the crash came after the decision, unpaid before it.
const COMMIT_PATH: &[(&str, &str)] = &[
    ("tcc.after_try_order", "unpaid"),
    ("tcc.after_try_wallet", "unpaid"),
    ("tcc.after_decide", "paid"),
    ("tcc.after_confirm_wallet", "paid"),
    // The wallet answered nothing though it acted (the answer was lost).
    ("wallet.tcc.before_try", "unpaid"),
    ("wallet.tcc.after_try", "unpaid"),
    ("wallet.tcc.after_end", "paid"),
];

/// Fail points on the abort path (the buyer's money does not cover the
/// order, so the payment aborts): the order always ends unpaid.
const ABORT_PATH: &[&str] = &[
    "tcc.after_decide_abort",
    "tcc.after_cancel_wallet",
    "tcc.after_cancel_order",
    "wallet.tcc.after_end",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_at_every_step_ends_consistent_after_recovery() {
    let scenario = fail::FailScenario::setup();
    let c = Ctx::start(40, PaymentMode::Tcc).await;
    FaultRun {
        commit_path: COMMIT_PATH,
        abort_path: ABORT_PATH,
        fail_points: tcc::FAIL_POINTS,
        fault_lingers: Duration::ZERO,
        one_pass: true,
    }
    .run(&c)
    .await;
    scenario.teardown();
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_wallet_down_for_5_s_payments_are_refused_and_nothing_moves() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(60, PaymentMode::Tcc).await;
    let (c, answers, ids) = pay_through_a_wallet_outage(c, 60).await;

    let refused = answers
        .iter()
        .filter(|r| **r == PayResult::Unavailable)
        .count();
    let paid = answers
        .iter()
        .filter(|r| matches!(r, PayResult::Paid(_)))
        .count();
    assert!(refused > 0, "the wallet was never seen down: {answers:?}");
    assert!(paid > 0);
    assert_eq!(
        refused + paid,
        answers.len(),
        "only paid or refused: {answers:?}"
    );
    // Whatever the outage left open, recovery ends.
    recover_once(&c.payments, Duration::ZERO)
        .await
        .expect("recovery");
    for (i, r) in answers.iter().enumerate() {
        let expected = if matches!(r, PayResult::Paid(_)) {
            "paid"
        } else {
            "unpaid"
        };
        assert_eq!(c.status(&ids[i]).await, expected);
    }
    c.assert_audits_clean().await;
    println!("wallet down 5 s: {paid} paid, {refused} refused (503), audits clean");
    c.finish().await;
}

/// What each kind of movement does to a wallet (the `wallet_move`
/// procedure): a freeze, unfreeze or debit of frozen money keeps balance
/// plus frozen or spends it; a movement the wallet cannot afford writes
/// nothing, not even its ledger row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_movement_moves_the_balances_its_kind_says_and_no_more() {
    use seckill_workers::statuses::LedgerKind;
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Tcc).await;
    /// (kind, from frozen money, amount, moves, (balance, frozen) after)
    type Movement = (LedgerKind, bool, i64, bool, (i64, i64));
    let steps: &[Movement] = &[
        (LedgerKind::Credit, false, 100, true, (100, 0)),
        (LedgerKind::Freeze, false, 30, true, (70, 30)),
        (LedgerKind::Unfreeze, false, 10, true, (80, 20)),
        (LedgerKind::Debit, true, 20, true, (80, 0)),
        (LedgerKind::Debit, false, 50, true, (30, 0)),
        (LedgerKind::Refund, false, 5, true, (35, 0)),
        // Not affordable: nothing moves.
        (LedgerKind::Debit, false, 36, false, (35, 0)),
        (LedgerKind::Freeze, false, 36, false, (35, 0)),
        (LedgerKind::Debit, true, 1, false, (35, 0)),
        (LedgerKind::Unfreeze, false, 1, false, (35, 0)),
    ];
    for (i, &(kind, from_frozen, amount_cents, moves, after)) in steps.iter().enumerate() {
        let tx_id = format!("{i:032x}");
        let movement = accounts::Movement {
            user_id: 7,
            kind,
            amount_cents,
            order_id: None,
            tx_id: Some(&tx_id),
        };
        let mut conn = c.wallet.db.acquire().await.unwrap();
        let moved = accounts::apply(&mut conn, &movement, from_frozen)
            .await
            .unwrap();
        assert_eq!(moved, moves, "step {i}: {kind:?} {amount_cents}");
        drop(conn);
        assert_eq!(
            c.balance(7).await,
            after,
            "step {i}: {kind:?} {amount_cents}"
        );
    }
    let ledger = accounts::statement(&c.wallet.db, 7).await.unwrap().ledger;
    assert_eq!(ledger.len(), 6, "one row per movement that happened");
    assert_eq!(
        (ledger[0].balance_after_cents, ledger[0].frozen_after_cents),
        (35, 0)
    );
    c.finish().await;
}

/// A step the database refuses halfway (a fence that holds money the
/// wallet does not have) rolls back whole: the fence is still `try`, no
/// ledger row was written, and the connection is fit for the next step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_refused_halfway_rolls_back_whole() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Tcc).await;
    c.wallet.credit(&[1], 10_000).await;
    let tx_id = new_tx_id();
    let order_id = uuid::Uuid::new_v4().to_string();
    let frozen = seckill_workers::wallet::tcc::try_freeze(&c.wallet.db, &tx_id, 1, &order_id, 500)
        .await
        .unwrap();
    assert_eq!(frozen, TryOutcome::Frozen);
    // The frozen money vanishes behind the fence's back.
    sqlx::query("UPDATE wallets SET frozen_cents = 0, balance_cents = balance_cents + 500 WHERE user_id = 1")
        .execute(&c.wallet.db)
        .await
        .unwrap();
    let ledger_rows = count(&c.wallet.db, "SELECT COUNT(*) FROM wallet_ledger").await;

    let refused = seckill_workers::wallet::tcc::confirm(&c.wallet.db, &tx_id).await;
    assert!(
        matches!(refused, Err(accounts::WalletError::Inconsistent(_))),
        "{refused:?}"
    );
    let phase: String =
        sqlx::query_scalar("SELECT CAST(phase AS CHAR) FROM tcc_fences WHERE tx_id = ?")
            .bind(&tx_id)
            .fetch_one(&c.wallet.db)
            .await
            .unwrap();
    assert_eq!(phase, "try");
    assert_eq!(
        count(&c.wallet.db, "SELECT COUNT(*) FROM wallet_ledger").await,
        ledger_rows
    );
    let open: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.innodb_trx WHERE trx_mysql_thread_id IN \
         (SELECT id FROM information_schema.processlist WHERE db = DATABASE())",
    )
    .fetch_one(&c.wallet.db)
    .await
    .unwrap();
    assert_eq!(open, 0, "no transaction left open on any connection");
    // Once the money is back where the fence says, its Cancel gives it back.
    sqlx::query("UPDATE wallets SET frozen_cents = 500, balance_cents = balance_cents - 500 WHERE user_id = 1")
        .execute(&c.wallet.db)
        .await
        .unwrap();
    assert_eq!(
        seckill_workers::wallet::tcc::cancel(&c.wallet.db, &tx_id)
            .await
            .unwrap(),
        EndOutcome::Done
    );
    assert_eq!(c.balance(1).await, (10_000, 0));
    c.finish().await;
}

/// Every step finds its rows by key: a procedure's parameters compared
/// with a column of another character set would scan (and lock, `FOR
/// UPDATE`) the whole table instead, which under load is a deadlock per
/// payment. Checked with the server's own counter of rows read by scan,
/// for the set statements (`*_set`) and for the item-by-item loops
/// (`*_group`) alike, one payment each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_reads_its_rows_by_key_never_by_scan() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Tcc).await;
    c.wallet.credit(&[1, 2], 10_000).await;
    let ids = c.orders(&[1, 2]).await;
    let filler = "INSERT INTO tcc_fences (tx_id, branch, phase) \
                  SELECT LPAD(HEX(seq), 32, '0'), 'filler', 'try' FROM seq_1_to_2000";
    for db in [&c.db, &c.wallet.db] {
        sqlx::query(filler).execute(db).await.unwrap();
    }
    let ways = [("group", 1, ITEM_TABLE_READS), ("set", 2, SET_TABLE_READS)];
    for ((way, user, table_reads), order) in ways.into_iter().zip(&ids) {
        let tx_id = new_tx_id();
        let order_steps = [
            format!(
                "CALL order_try_{way}('[[\"{tx_id}\", {user}, \"{order}\", 1, {PRICE}, \"tcc\"]]', \
                 'order_not_payable')"
            ),
            format!("CALL order_end_{way}('[[\"{tx_id}\", \"confirm\", 1]]')"),
        ];
        let wallet_steps = [
            format!("CALL wallet_try_{way}('[[\"{tx_id}\", {user}, \"{order}\", {PRICE}]]')"),
            format!("CALL wallet_end_{way}('[[\"{tx_id}\", \"confirm\"]]')"),
        ];
        for (db, steps) in [(&c.db, &order_steps), (&c.wallet.db, &wallet_steps)] {
            let mut conn = db.acquire().await.unwrap();
            for step in steps.iter() {
                let before = rows_scanned(&mut conn).await;
                let outcome: Option<String> = sqlx::query_scalar(step.as_str())
                    .fetch_one(&mut *conn)
                    .await
                    .unwrap();
                let scanned = rows_scanned(&mut conn).await - before;
                assert!(
                    scanned <= table_reads,
                    "{step} answered {outcome:?} scanning {scanned} rows"
                );
                assert!(
                    !outcome.as_deref().unwrap_or("").contains("inconsistent"),
                    "{step}: {outcome:?}"
                );
            }
        }
        assert_eq!(c.status(order).await, "paid", "{way}");
        assert_eq!(c.balance(user).await, (10_000 - PRICE, 0), "{way}");
    }
    c.finish().await;
}

/// Rows MariaDB reads by scan to walk a group of one's item list: the
/// JSON_TABLE's row and its end, once to fill the cursor and once to
/// fetch. A scan of the 2,000 filler fences would read thousands.
const ITEM_TABLE_READS: i64 = 3;

/// The same for a set procedure: its item list read once by each of its
/// statements (a row and its end), and a multi-table `UPDATE`'s own
/// table of the rows it is to change, read back once.
const SET_TABLE_READS: i64 = 16;

async fn rows_scanned(conn: &mut sqlx::MySqlConnection) -> i64 {
    session_status(conn, "Handler_read_rnd_next").await
}

/// One group runs each item as it would run alone (through the `*_set`
/// procedure, which hands a group like this one, not all plain, to its
/// item-by-item `*_group`): a Try that freezes, one
/// the balance does not cover, a repeat of the first in the same group, a
/// Try its Cancel came before; then ends that confirm, roll back empty, and
/// one the database refuses (its frozen money gone), which is undone alone
/// while the rest of its group commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_group_answers_each_item_as_it_would_alone() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Tcc).await;
    c.wallet.credit(&[1, 3], 10_000).await;
    let order = || uuid::Uuid::new_v4().to_string();
    let (a, b, d, f) = (new_tx_id(), new_tx_id(), new_tx_id(), new_tx_id());
    let cancelled_first = seckill_workers::wallet::tcc::cancel(&c.wallet.db, &d)
        .await
        .unwrap();
    assert_eq!(cancelled_first, EndOutcome::EmptyRollback);
    let tries = serde_json::json!([
        [a, 1, order(), 500],
        [b, 2, order(), 500],
        [a, 1, order(), 500],
        [d, 1, order(), 500],
        [f, 3, order(), 700],
    ]);
    let outcomes = group(&c.wallet.db, "wallet_try_set", &tries).await;
    assert_eq!(
        outcomes,
        [
            "frozen",
            "insufficient_funds",
            "repeat",
            "suspended",
            "frozen"
        ]
    );
    assert_eq!(c.balance(1).await, (9_500, 500));
    assert_eq!(c.balance(3).await, (9_300, 700));
    // User 3's frozen money vanishes behind the fence's back.
    sqlx::query("UPDATE wallets SET frozen_cents = 0 WHERE user_id = 3")
        .execute(&c.wallet.db)
        .await
        .unwrap();
    let ledger_rows = count(&c.wallet.db, "SELECT COUNT(*) FROM wallet_ledger").await;
    let ends = serde_json::json!([
        [a, "confirm"],
        [b, "cancel"],
        [f, "confirm"],
        [a, "confirm"]
    ]);
    let outcomes = group(&c.wallet.db, "wallet_end_set", &ends).await;
    assert_eq!(outcomes[0], "done");
    assert_eq!(outcomes[1], "empty_rollback");
    assert!(
        outcomes[2].starts_with("inconsistent: "),
        "{:?}",
        outcomes[2]
    );
    assert_eq!(outcomes[3], "repeat");
    assert_eq!(c.balance(1).await, (9_500, 0), "a's one debit");
    assert_eq!(c.balance(3).await, (9_300, 0), "f undone alone");
    assert_eq!(
        count(&c.wallet.db, "SELECT COUNT(*) FROM wallet_ledger").await,
        ledger_rows + 1,
        "one ledger row: a's debit"
    );
    let phases: Vec<(String, String)> = sqlx::query_as(
        "SELECT tx_id, CAST(phase AS CHAR) FROM tcc_fences WHERE branch = 'wallet' ORDER BY tx_id",
    )
    .fetch_all(&c.wallet.db)
    .await
    .unwrap();
    let phase = |tx: &str| {
        phases
            .iter()
            .find(|(t, _)| t == tx)
            .map(|(_, p)| p.as_str())
    };
    assert_eq!(phase(&a), Some("confirm"));
    assert_eq!(phase(&b), Some("cancel"), "the empty rollback is recorded");
    assert_eq!(phase(&d), Some("cancel"));
    assert_eq!(
        phase(&f),
        Some("try"),
        "the refused Confirm changed nothing"
    );
    c.finish().await;
}

/// Calls a `*_set` or `*_group` procedure with `items`, answering its
/// outcomes.
async fn group(db: &sqlx::MySqlPool, procedure: &str, items: &serde_json::Value) -> Vec<String> {
    let answer: String = sqlx::query_scalar(&format!("CALL {procedure}(?)"))
        .bind(items.to_string())
        .fetch_one(db)
        .await
        .unwrap();
    serde_json::from_str(&answer).unwrap()
}

/// The order side's groups: a Try that holds, a second payment of the same
/// order in the same group (refused, logged `aborted`, nothing kept), a
/// Try of someone else's order; then a decision with its Confirm, one the
/// log refuses (`not_decided`) and a Cancel with no Try, in one group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_group_answers_each_item_as_it_would_alone() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Tcc).await;
    let ids = c.orders(&[1, 2]).await;
    let (a, b, d, e) = (new_tx_id(), new_tx_id(), new_tx_id(), new_tx_id());
    let tries = serde_json::json!([
        [a, 1, ids[0], 1, PRICE, "tcc"],
        [b, 1, ids[0], 1, PRICE, "tcc"],
        [d, 1, ids[1], 1, PRICE, "tcc"],
    ]);
    let answer: String = sqlx::query_scalar("CALL order_try_set(?, 'order_not_payable')")
        .bind(tries.to_string())
        .fetch_one(&c.db)
        .await
        .unwrap();
    let outcomes: Vec<String> = serde_json::from_str(&answer).unwrap();
    assert_eq!(outcomes, ["held", "refused", "refused"]);
    let states: Vec<(String, String)> =
        sqlx::query_as("SELECT tx_id, CAST(state AS CHAR) FROM pay_transactions ORDER BY tx_id")
            .fetch_all(&c.db)
            .await
            .unwrap();
    let state = |tx: &str| states.iter().find(|(t, _)| t == tx).map(|(_, s)| s.clone());
    assert_eq!(state(&a).as_deref(), Some("started"));
    assert_eq!(state(&b).as_deref(), Some("aborted"));
    assert_eq!(state(&d).as_deref(), Some("aborted"));
    assert_eq!(
        count(&c.db, "SELECT COUNT(*) FROM tcc_fences").await,
        1,
        "refused Tries keep no fence"
    );
    let ends = serde_json::json!([[a, "confirm", 1], [b, "confirm", 1], [e, "cancel", 0]]);
    let answer: String = sqlx::query_scalar("CALL order_end_set(?)")
        .bind(ends.to_string())
        .fetch_one(&c.db)
        .await
        .unwrap();
    let outcomes: Vec<String> = serde_json::from_str(&answer).unwrap();
    assert_eq!(outcomes, ["done", "not_decided", "empty_rollback"]);
    assert_eq!(c.status(&ids[0]).await, "paid");
    assert_eq!(c.status(&ids[1]).await, "unpaid");
    c.finish().await;
}

/// Grouped order reads answer each buyer only their own order: someone
/// else's, an unknown id and an SQL-looking one are all `None`, whatever
/// group they share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_order_reads_answer_each_buyer_only_their_own() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Tcc).await;
    let ids = c.orders(&[1, 2]).await;
    let limits = seckill_workers::group_commit::GroupLimits {
        max_items: 8,
        in_flight: 1,
    };
    let reads = std::sync::Arc::new(seckill_workers::orders::OrderReads::start(&c.db, limits));
    let unknown = uuid::Uuid::new_v4().to_string();
    let asks = [
        (1, ids[0].clone(), true),
        (1, ids[1].clone(), false),
        (2, ids[1].clone(), true),
        (2, ids[0].clone(), false),
        (1, unknown, false),
        (1, "x' OR '1'='1".to_string(), false),
    ];
    let calls: Vec<_> = asks
        .iter()
        .cloned()
        .map(|(user, id, _)| {
            let reads = reads.clone();
            tokio::spawn(async move { reads.get_for_user(user, &id).await })
        })
        .collect();
    for ((user, id, own), call) in asks.iter().zip(calls) {
        let found = call.await.unwrap().unwrap();
        assert_eq!(
            found.as_ref().map(|o| o.id.as_str()),
            own.then_some(id.as_str()),
            "user {user} asking for {id}"
        );
    }
    c.finish().await;
}

/// The log's grouped moves are each the guarded move they were alone: of
/// two moves of one transaction from the same state in one group (a
/// decision racing recovery's abort), the first moves it and the second
/// stays; an abort's reason is recorded, an empty one keeps the row's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_log_group_moves_each_transaction_once() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Tcc).await;
    let ids = c.orders(&[1, 2]).await;
    let (a, b) = (new_tx_id(), new_tx_id());
    let tries = serde_json::json!([
        [a, 1, ids[0], 1, PRICE, "tcc"],
        [b, 2, ids[1], 1, PRICE, "tcc"]
    ]);
    sqlx::query("CALL order_try_set(?, 'order_not_payable')")
        .bind(tries.to_string())
        .execute(&c.db)
        .await
        .unwrap();
    let moves = serde_json::json!([
        [a, "started", "committing", ""],
        [a, "started", "aborting", "timeout"],
        [b, "started", "aborting", "timeout"],
        [b, "aborting", "aborted", ""],
    ]);
    let answer: String = sqlx::query_scalar("CALL log_move_set(?)")
        .bind(moves.to_string())
        .fetch_one(&c.db)
        .await
        .unwrap();
    let outcomes: Vec<String> = serde_json::from_str(&answer).unwrap();
    assert_eq!(outcomes, ["moved", "stayed", "moved", "moved"]);
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT tx_id, CAST(state AS CHAR), CAST(reason AS CHAR) FROM pay_transactions ORDER BY tx_id",
    )
    .fetch_all(&c.db)
    .await
    .unwrap();
    let row = |tx: &str| rows.iter().find(|r| r.0 == tx).cloned().unwrap();
    assert_eq!(row(&a).1, "committing");
    assert_eq!(row(&a).2, None);
    assert_eq!(row(&b).1, "aborted");
    assert_eq!(row(&b).2.as_deref(), Some("timeout"));
    c.finish().await;
}

/// A group whose every item is the plain case runs as a handful of set
/// statements, whatever its size, and moves exactly what the items would
/// item by item: eight payments' Tries hold and freeze, six Confirms and
/// two Cancels in one group each, the log's moves. Every ledger row holds
/// the balances after its own movement. The same groups again (repeats,
/// suspensions, decisions too late: item by item) change nothing. Two Tries of one wallet in
/// one group go item by item (each ledger row after the one before it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_plain_steps_runs_as_set_statements_and_moves_what_its_items_would() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Tcc).await;
    let users: Vec<u64> = (1..=8).collect();
    c.wallet.credit(&users, 10_000).await;
    let ids = c.orders(&users).await;
    let txs: Vec<String> = users.iter().map(|_| new_tx_id()).collect();
    let confirmed = 6;
    let tries = serde_json::json!(users
        .iter()
        .zip(&ids)
        .zip(&txs)
        .map(|((u, o), t)| serde_json::json!([t, u, o, 1, PRICE, "tcc"]))
        .collect::<Vec<_>>());
    let (outcomes, order_try) =
        counted(&c.db, "order_try_set(?, 'order_not_payable')", &tries).await;
    assert_eq!(outcomes, ["held"; 8]);
    let wallet_tries = serde_json::json!(users
        .iter()
        .zip(&ids)
        .zip(&txs)
        .map(|((u, o), t)| serde_json::json!([t, u, o, PRICE]))
        .collect::<Vec<_>>());
    let (outcomes, wallet_try) = counted(&c.wallet.db, "wallet_try_set(?)", &wallet_tries).await;
    assert_eq!(outcomes, ["frozen"; 8]);
    assert_eq!(c.balance(1).await, (10_000 - PRICE, PRICE));
    assert_eq!(c.status(&ids[0]).await, "paying");
    // The last two are decided `aborting` first, as an abort is.
    let aborts = serde_json::json!(txs[confirmed..]
        .iter()
        .map(|t| serde_json::json!([t, "started", "aborting", "insufficient_funds"]))
        .collect::<Vec<_>>());
    let (outcomes, _) = counted(&c.db, "log_move_set(?)", &aborts).await;
    assert_eq!(outcomes, ["moved"; 2]);
    let end = |t: &String, i: usize| {
        if i < confirmed {
            (t.clone(), "confirm", 1)
        } else {
            (t.clone(), "cancel", 0)
        }
    };
    let ends = serde_json::json!(txs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let (t, phase, decide) = end(t, i);
            serde_json::json!([t, phase, decide])
        })
        .collect::<Vec<_>>());
    let (outcomes, order_end) = counted(&c.db, "order_end_set(?)", &ends).await;
    assert_eq!(outcomes, ["done"; 8]);
    let wallet_ends = serde_json::json!(txs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let (t, phase, _) = end(t, i);
            serde_json::json!([t, phase])
        })
        .collect::<Vec<_>>());
    let (outcomes, wallet_end) = counted(&c.wallet.db, "wallet_end_set(?)", &wallet_ends).await;
    assert_eq!(outcomes, ["done"; 8]);
    let lasts = serde_json::json!(txs
        .iter()
        .enumerate()
        .map(|(i, t)| if i < confirmed {
            serde_json::json!([t, "committing", "committed", ""])
        } else {
            serde_json::json!([t, "aborting", "aborted", ""])
        })
        .collect::<Vec<_>>());
    let (outcomes, log_move) = counted(&c.db, "log_move_set(?)", &lasts).await;
    assert_eq!(outcomes, ["moved"; 8]);
    // A set procedure runs its few statements once per group; item by item
    // it would be at least five per item.
    for (step, statements) in [
        ("order Try", order_try),
        ("wallet Try", wallet_try),
        ("order end", order_end),
        ("wallet end", wallet_end),
        ("log move", log_move),
    ] {
        assert!(
            statements <= SET_STATEMENTS,
            "{step}: {statements} statements for 8 items"
        );
    }
    for (i, ((user, order), tx)) in users.iter().zip(&ids).zip(&txs).enumerate() {
        let paid = i < confirmed;
        assert_eq!(c.status(order).await, if paid { "paid" } else { "unpaid" });
        let paid_at: Option<String> =
            sqlx::query_scalar("SELECT CAST(paid_at AS CHAR) FROM orders WHERE id = ?")
                .bind(order)
                .fetch_one(&c.db)
                .await
                .unwrap();
        assert_eq!(paid_at.is_some(), paid, "paid_at of {order}");
        let balance = if paid { 10_000 - PRICE } else { 10_000 };
        assert_eq!(c.balance(*user).await, (balance, 0), "user {user}");
        let ledger: Vec<(String, i64, i64, i64, Option<String>)> = sqlx::query_as(
            "SELECT CAST(kind AS CHAR), amount_cents, balance_after, frozen_after, order_id \
             FROM wallet_ledger WHERE tx_id = ? ORDER BY id",
        )
        .bind(tx)
        .fetch_all(&c.wallet.db)
        .await
        .unwrap();
        let second = if paid {
            (
                "debit".to_string(),
                PRICE,
                10_000 - PRICE,
                0,
                Some(order.clone()),
            )
        } else {
            (
                "unfreeze".to_string(),
                PRICE,
                10_000,
                0,
                Some(order.clone()),
            )
        };
        let first = (
            "freeze".to_string(),
            PRICE,
            10_000 - PRICE,
            PRICE,
            Some(order.clone()),
        );
        assert_eq!(ledger, [first, second], "ledger of {tx}");
        let state: String =
            sqlx::query_scalar("SELECT CAST(state AS CHAR) FROM pay_transactions WHERE tx_id = ?")
                .bind(tx)
                .fetch_one(&c.db)
                .await
                .unwrap();
        assert_eq!(state, if paid { "committed" } else { "aborted" });
    }
    // The same groups again: every item a repeat, nothing moves.
    let ledger_rows = count(&c.wallet.db, "SELECT COUNT(*) FROM wallet_ledger").await;
    let (outcomes, _) = counted(&c.wallet.db, "wallet_try_set(?)", &wallet_tries).await;
    assert_eq!(&outcomes[..confirmed], ["repeat"; 6]);
    assert_eq!(
        &outcomes[confirmed..],
        ["suspended"; 2],
        "a Try after its Cancel"
    );
    let (outcomes, _) = counted(&c.wallet.db, "wallet_end_set(?)", &wallet_ends).await;
    assert_eq!(outcomes, ["repeat"; 8]);
    let (outcomes, _) = counted(&c.db, "order_end_set(?)", &ends).await;
    assert_eq!(&outcomes[..confirmed], ["not_decided"; 6]);
    assert_eq!(&outcomes[confirmed..], ["repeat"; 2]);
    let (outcomes, _) = counted(&c.db, "log_move_set(?)", &lasts).await;
    assert_eq!(outcomes, ["stayed"; 8]);
    assert_eq!(
        count(&c.wallet.db, "SELECT COUNT(*) FROM wallet_ledger").await,
        ledger_rows
    );
    assert_eq!(c.balance(1).await, (10_000 - PRICE, 0));
    // Two Tries of one wallet in one group: item by item, each ledger row
    // after the one before it.
    c.wallet.credit(&[20], 1_000).await;
    let (first, second) = (new_tx_id(), new_tx_id());
    let order = || uuid::Uuid::new_v4().to_string();
    let two = serde_json::json!([[first, 20, order(), 300], [second, 20, order(), 400]]);
    let (outcomes, statements) = counted(&c.wallet.db, "wallet_try_set(?)", &two).await;
    assert_eq!(outcomes, ["frozen"; 2]);
    assert!(
        statements > SET_STATEMENTS / 2,
        "item by item: {statements}"
    );
    let afters: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT balance_after, frozen_after FROM wallet_ledger WHERE user_id = 20 \
         AND kind = 'freeze' ORDER BY id",
    )
    .fetch_all(&c.wallet.db)
    .await
    .unwrap();
    assert_eq!(afters, [(700, 300), (300, 700)]);
    assert_eq!(c.balance(20).await, (300, 700));
    for tx in [&first, &second] {
        seckill_workers::wallet::tcc::cancel(&c.wallet.db, tx)
            .await
            .unwrap();
    }
    assert_eq!(c.balance(20).await, (1_000, 0));
    c.assert_audits_clean().await;
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_at_once_share_wallet_calls_and_each_gets_its_own_answer() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(120, PaymentMode::Tcc).await;
    pay_at_once_in_batches(&c, 120, "/internal/tcc/try").await;
    c.finish().await;
}
