//! Reliable-message payments against the real MariaDB, Redis and RabbitMQ,
//! with the wallet service in-process: the debit and its outbox message,
//! the relay and the api's consumer settling the order, the check-back,
//! duplicates, a compensating refund, a fault injected at every step
//! followed by recovery, and the wallet down mid-run. Every test ends with
//! `audit --payments` clean (SPEC invariant 7, nothing in flight) and the
//! sale audit clean.
//!
//! Fail points are process-wide and the wallet runs in this process: every
//! test holds the fail-point lock (`FailScenario`).

#[path = "payments_support.rs"]
mod payments;

use std::time::Duration;

use payments::support::count;
use payments::{
    counted, pay_at_once_in_batches, pay_through_a_wallet_outage, pay_twice_at_once, recover_all,
    Ctx, FaultRun, PRICE, SET_STATEMENTS,
};
use seckill_contracts::config::PaymentMode;
use seckill_workers::payments::log::{new_tx_id, PayTx};
use seckill_workers::payments::message::{self, Settled};
use seckill_workers::payments::order_branch::{self, HoldOutcome};
use seckill_workers::payments::wallet_client::{WalletCallError, WalletClient};
use seckill_workers::payments::PayResult;
use seckill_workers::statuses::{AbortReason, TxState};
use seckill_workers::wallet::accounts;
use seckill_workers::wallet::message::{DebitOutcome, Resolution};
use seckill_workers::wallet::routes::TryRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_is_accepted_then_settles_paid_on_the_wallets_message() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Message).await;
    c.wallet.credit(&[1], 10_000).await;
    let ids = c.orders(&[1]).await;

    let answer = c.pay(1, &ids[0]).await;
    // Accepted as soon as the wallet debited: paying until the message
    // lands (or paid already, if it was quicker than the answer).
    match &answer {
        PayResult::Settling(o) => assert!(["paying", "paid"].contains(&o.status.as_str())),
        PayResult::Paid(_) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(c.wait_status(&ids[0], "paid").await, "paid");
    assert_eq!(c.balance(1).await, (10_000 - PRICE, 0));
    let ledger = accounts::statement(&c.wallet.db, 1).await.unwrap().ledger;
    let kinds: Vec<&str> = ledger.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["debit", "credit"]);

    assert_eq!(c.pay(1, &ids[0]).await, PayResult::AlreadyPaid);
    assert_eq!(c.pay(2, &ids[0]).await, PayResult::NotFound);
    c.assert_audits_clean().await;
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_enough_money_is_refused_at_once_and_moves_nothing() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Message).await;
    c.wallet.credit(&[1], PRICE - 1).await;
    let ids = c.orders(&[1]).await;

    assert_eq!(c.pay(1, &ids[0]).await, PayResult::InsufficientFunds);
    assert_eq!(c.status(&ids[0]).await, "unpaid");
    assert_eq!(c.balance(1).await, (PRICE - 1, 0));
    c.wallet.credit(&[1], 1).await;
    assert!(matches!(
        c.pay(1, &ids[0]).await,
        PayResult::Settling(_) | PayResult::Paid(_)
    ));
    assert_eq!(c.wait_status(&ids[0], "paid").await, "paid");
    assert_eq!(c.balance(1).await, (0, 0));
    c.assert_audits_clean().await;
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_paying_twice_at_once_is_charged_once() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Message).await;
    pay_twice_at_once(&c).await;
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_back_decides_once_and_a_later_debit_is_refused() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Message).await;
    c.wallet.credit(&[1], 10_000).await;
    let ids = c.orders(&[1]).await;
    let wallet = WalletClient::new(c.config());
    let debit = |tx: &str| TryRequest {
        tx_id: tx.to_string(),
        user_id: 1,
        order_id: ids[0].clone(),
        amount_cents: PRICE,
    };

    // Checked back first: cancelled for good, the debit after it refused.
    let tx = new_tx_id();
    assert_eq!(
        wallet.message_resolve(&tx).await.unwrap(),
        Resolution::Cancelled
    );
    assert_eq!(
        wallet.message_debit(&debit(&tx)).await.unwrap(),
        DebitOutcome::Cancelled
    );
    assert_eq!(c.balance(1).await, (10_000, 0));
    // Debited first: the check-back says so, a repeat debits nothing.
    let tx = new_tx_id();
    assert_eq!(
        wallet.message_debit(&debit(&tx)).await.unwrap(),
        DebitOutcome::Debited
    );
    assert_eq!(
        wallet.message_debit(&debit(&tx)).await.unwrap(),
        DebitOutcome::Repeat
    );
    assert_eq!(
        wallet.message_resolve(&tx).await.unwrap(),
        Resolution::Debited
    );
    assert_eq!(c.balance(1).await, (10_000 - PRICE, 0));
    // Bad input changes nothing.
    let bad = TryRequest {
        tx_id: "1 OR 1=1".into(),
        ..debit(&new_tx_id())
    };
    assert!(matches!(
        wallet.message_debit(&bad).await,
        Err(WalletCallError::Refused { status: 400, .. })
    ));
    // (The debit above was never logged by a coordinator: its message is
    // for an unknown payment, which the api ignores. Only the sale audit
    // is meaningful here.)
    c.assert_sale_audit_clean().await;
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_settles_once_however_often_it_arrives() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Message).await;
    c.wallet.credit(&[1], 10_000).await;
    let ids = c.orders(&[1]).await;
    c.pay(1, &ids[0]).await;
    assert_eq!(c.wait_status(&ids[0], "paid").await, "paid");
    let tx_id: String = sqlx::query_scalar("SELECT tx_id FROM pay_transactions")
        .fetch_one(&c.db)
        .await
        .unwrap();
    // The same message again (a redelivery), and another for the same
    // payment: nothing changes.
    let consumed: String = sqlx::query_scalar("SELECT message_id FROM consumed_messages")
        .fetch_one(&c.db)
        .await
        .unwrap();
    assert_eq!(
        message::settle(&c.payments, &tx_id, &consumed)
            .await
            .unwrap(),
        Settled::Duplicate
    );
    assert_eq!(
        message::settle(&c.payments, &tx_id, &new_tx_id())
            .await
            .unwrap(),
        Settled::Duplicate
    );
    // A message for a payment nobody logged is ignored.
    assert_eq!(
        message::settle(&c.payments, &new_tx_id(), &new_tx_id())
            .await
            .unwrap(),
        Settled::Unknown
    );
    assert_eq!(c.balance(1).await, (10_000 - PRICE, 0));
    c.assert_audits_clean().await;
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debit_landing_on_a_payment_given_up_is_refunded_once() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Message).await;
    c.wallet.credit(&[1], 10_000).await;
    let ids = c.orders(&[1]).await;
    // The api dies after holding the order; recovery checks back (nothing
    // debited: cancelled for good) and gives the order back.
    fail::cfg("message.after_hold", "return").unwrap();
    assert!(c
        .payments
        .pay(&mut c.redis.clone(), 1, &ids[0])
        .await
        .is_err());
    fail::remove("message.after_hold");
    let report = recover_all(&c.payments).await;
    assert_eq!(report.aborted, 1, "{report:?}");
    assert_eq!(c.status(&ids[0]).await, "unpaid");
    let tx_id: String = sqlx::query_scalar("SELECT tx_id FROM pay_transactions")
        .fetch_one(&c.db)
        .await
        .unwrap();
    // The wallet's database is restored from a backup taken before the
    // check-back (its fence row is gone), and the old debit request is
    // replayed: the money leaves, a debited message goes out...
    sqlx::query("DELETE FROM tcc_fences WHERE tx_id = ?")
        .bind(&tx_id)
        .execute(&c.wallet.db)
        .await
        .unwrap();
    let wallet = WalletClient::new(c.config());
    let replayed = wallet
        .message_debit(&TryRequest {
            tx_id: tx_id.clone(),
            user_id: 1,
            order_id: ids[0].clone(),
            amount_cents: PRICE,
        })
        .await
        .unwrap();
    assert_eq!(replayed, DebitOutcome::Debited);
    // ...and the order side, which gave the payment up, sends it back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.balance(1).await != (10_000, 0) {
        assert!(tokio::time::Instant::now() < deadline, "never refunded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ledger = accounts::statement(&c.wallet.db, 1).await.unwrap().ledger;
    let kinds: Vec<&str> = ledger.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["refund", "debit", "credit"]);
    assert_eq!(c.status(&ids[0]).await, "unpaid");
    c.assert_audits_clean().await;
    c.finish().await;
}

/// Where each fail point leaves the order once everything has settled.
const COMMIT_PATH: &[(&str, &str)] = &[
    ("message.after_hold", "unpaid"),
    // The debit happened; its message settles the order anyway.
    ("message.after_debit", "paid"),
    // The wallet debited but its answer was lost: the check-back finds it.
    ("wallet.message.after_debit", "paid"),
    // The consumer dies before its transaction commits: redelivered.
    ("message.before_settle_commit", "paid"),
    // The relay published but did not mark: published again, deduped.
    ("outbox.after_publish", "paid"),
];

/// On the abort path (the buyer cannot afford the order).
const ABORT_PATH: &[&str] = &["message.after_decide_abort"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_at_every_step_ends_consistent_after_recovery() {
    let scenario = fail::FailScenario::setup();
    let c = Ctx::start(20, PaymentMode::Message).await;
    FaultRun {
        commit_path: COMMIT_PATH,
        abort_path: ABORT_PATH,
        fail_points: message::FAIL_POINTS,
        fault_lingers: Duration::from_millis(700),
        one_pass: false,
    }
    .run(&c)
    .await;
    scenario.teardown();
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_wallet_down_for_5_s_payments_wait_and_end_consistent() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(60, PaymentMode::Message).await;
    let (c, answers, ids) = pay_through_a_wallet_outage(c, 60).await;

    // While the wallet is down nothing is known: accepted (202), the
    // order `paying` until the check-back after it returns.
    let accepted = answers
        .iter()
        .filter(|r| matches!(r, PayResult::Paid(_) | PayResult::Settling(_)))
        .count();
    assert_eq!(accepted, answers.len(), "{answers:?}");
    recover_all(&c.payments).await;
    c.assert_audits_clean().await;
    let paid = payments::count_status(&c.db, "paid").await;
    let unpaid = payments::count_status(&c.db, "unpaid").await;
    assert_eq!(paid + unpaid, 60);
    assert!(unpaid > 0, "the outage never showed");
    for (i, id) in ids.iter().enumerate() {
        let spent = if c.status(id).await == "paid" {
            PRICE
        } else {
            0
        };
        assert_eq!(c.balance(i as u64 + 1).await, (10_000 - spent, 0));
    }
    println!("message, wallet down 5 s: {paid} paid, {unpaid} given back after the check-back, audits clean");
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_message_records_are_pruned_and_recent_ones_kept() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Message).await;
    c.wallet.credit(&[1, 2], 10_000).await;
    let ids = c.orders(&[1, 2]).await;
    for (user, id) in [(1, &ids[0]), (2, &ids[1])] {
        c.pay(user, id).await;
        assert_eq!(c.wait_status(id, "paid").await, "paid");
    }
    // The first payment's records are two days old, the second's fresh.
    let first: String = sqlx::query_scalar("SELECT tx_id FROM pay_transactions WHERE order_id = ?")
        .bind(&ids[0])
        .fetch_one(&c.db)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE consumed_messages SET consumed_at = NOW(3) - INTERVAL 2 DAY \
         WHERE message_id <> ? ORDER BY consumed_at LIMIT 1",
    )
    .bind(&first)
    .execute(&c.db)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE outbox SET published_at = NOW(3) - INTERVAL 2 DAY \
         WHERE payload LIKE CONCAT('%', ?, '%')",
    )
    .bind(&first)
    .execute(&c.wallet.db)
    .await
    .unwrap();
    let day = 86_400;
    assert_eq!(message::prune_consumed(&c.payments, day).await.unwrap(), 1);
    assert_eq!(
        seckill_workers::outbox::prune(&c.wallet.db, day)
            .await
            .unwrap(),
        1
    );
    assert_eq!(message::prune_consumed(&c.payments, day).await.unwrap(), 0);
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox")
        .fetch_one(&c.wallet.db)
        .await
        .unwrap();
    assert_eq!(left, 1, "the recent message stays");
    // A repeat of the pruned payment's message still changes nothing: the
    // log's state dedupes it.
    assert_eq!(
        message::settle(&c.payments, &first, &new_tx_id())
            .await
            .unwrap(),
        Settled::Duplicate
    );
    c.assert_audits_clean().await;
    c.finish().await;
}

/// The relay keeps the rows it publishes locked until the broker has
/// confirmed them; a debit writing its own message meanwhile must not wait
/// for the relay (under repeatable read its scan also locked the gap new
/// messages go into: under load such debits waited, and some deadlocked
/// with the relay's mark and were refused as a wallet failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debit_never_waits_for_the_relay_publishing_before_it() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Message).await;
    c.wallet.credit(&[1, 2], 10_000).await;
    let ids = c.orders(&[1, 2]).await;
    // Every relay pass now holds its transaction open for 3 s after the
    // broker's confirms, before it marks what it published. (The pause
    // blocks the relay's thread: nothing here waits on what that thread
    // would run next, such as the consumer settling the first order.)
    fail::cfg("outbox.after_publish", "sleep(3000)").unwrap();
    let first = c.pay(1, &ids[0]).await;
    assert!(
        matches!(first, PayResult::Settling(_) | PayResult::Paid(_)),
        "{first:?}"
    );
    // Woken by that debit, the relay publishes its message (milliseconds)
    // and sits in its pause, holding the row.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let unpublished = || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(&c.wallet.db)
            .await
            .unwrap()
    };
    assert_eq!(unpublished().await, 1);

    let second = c.pay(2, &ids[1]).await;
    assert!(
        matches!(second, PayResult::Settling(_) | PayResult::Paid(_)),
        "{second:?}"
    );
    assert_eq!(
        unpublished().await,
        2,
        "the second debit and its message went in while the relay still held the first"
    );
    fail::remove("outbox.after_publish");
    for id in &ids {
        assert_eq!(c.wait_status(id, "paid").await, "paid");
    }
    c.assert_audits_clean().await;
    c.finish().await;
}

/// The debit's procedure, with a group not all plain (so item by item):
/// in one group, a debit, one the balance
/// does not cover (nothing kept, not even its fence), a repeat of the
/// first, one whose check-back came first (cancelled) and another user's;
/// each answered as it would be alone, with exactly one ledger row and one
/// outbox message per debit. Then a burst through the service's grouped
/// path debits every payment once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_debit_group_answers_each_item_as_it_would_alone() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(10, PaymentMode::Message).await;
    c.wallet.credit(&[1, 3], 10_000).await;
    let db = &c.wallet.db;
    let (a, b, d, f) = (new_tx_id(), new_tx_id(), new_tx_id(), new_tx_id());
    let resolved = seckill_workers::wallet::message::resolve(db, &d)
        .await
        .unwrap();
    assert_eq!(resolved, Resolution::Cancelled);
    let ledger_before = count(db, "SELECT COUNT(*) FROM wallet_ledger").await;
    let item = |tx: &str, user: u64, amount: i64| {
        let order = uuid::Uuid::new_v4().to_string();
        let m =
            message::PaymentMessage::new(message::MessageKind::Debited, tx, &order, user, amount);
        serde_json::json!([tx, user, order, amount, m.message_id, m.to_json()])
    };
    let items = serde_json::json!([
        item(&a, 1, 500),
        item(&b, 2, 500),
        item(&a, 1, 500),
        item(&d, 1, 500),
        item(&f, 3, 700),
    ]);
    let answer: String = sqlx::query_scalar("CALL wallet_debit_set(?)")
        .bind(items.to_string())
        .fetch_one(db)
        .await
        .unwrap();
    let outcomes: Vec<String> = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        outcomes,
        [
            "debited",
            "insufficient_funds",
            "repeat",
            "cancelled",
            "debited"
        ]
    );
    assert_eq!(c.balance(1).await, (9_500, 0));
    assert_eq!(c.balance(3).await, (9_300, 0));
    assert_eq!(
        count(db, "SELECT COUNT(*) FROM wallet_ledger").await,
        ledger_before + 2,
        "one ledger row per debit"
    );
    let outbox_for = |tx: &str| {
        format!("SELECT COUNT(*) FROM outbox WHERE JSON_VALUE(payload, '$.tx_id') = '{tx}'")
    };
    for (tx, messages) in [(&a, 1), (&b, 0), (&d, 0), (&f, 1)] {
        assert_eq!(count(db, &outbox_for(tx)).await, messages, "{tx}");
    }
    let fences = |tx: &str| {
        format!("SELECT COUNT(*) FROM tcc_fences WHERE tx_id = '{tx}' AND branch = 'message'")
    };
    assert_eq!(
        count(db, &fences(&b)).await,
        0,
        "the refused debit kept no fence"
    );

    // The service's path: concurrent debits share groups, each done once.
    let users: Vec<u64> = (10..40).collect();
    c.wallet.credit(&users, 1_000).await;
    let limits = seckill_workers::group_commit::GroupLimits {
        max_items: 8,
        in_flight: 2,
    };
    let debits = std::sync::Arc::new(seckill_workers::wallet::message::Debits::start(db, limits));
    let runs = users.iter().map(|&user| {
        let debits = debits.clone();
        async move {
            let order = uuid::Uuid::new_v4().to_string();
            debits.debit(&new_tx_id(), user, &order, 300).await
        }
    });
    for outcome in futures::future::join_all(runs).await {
        assert_eq!(outcome.unwrap(), DebitOutcome::Debited);
    }
    for &user in &users {
        assert_eq!(c.balance(user).await, (700, 0), "user {user}");
    }
    // (These debits were never logged by a coordinator: their messages are
    // for unknown payments, which the api ignores. Only the sale audit is
    // meaningful here.)
    c.assert_sale_audit_clean().await;
    c.finish().await;
}

/// The settle's procedure, with a group not all plain (so item by
/// item): in one group, a payment whose debit
/// lands (paid), one given up before its debit landed (nothing kept: the
/// caller refunds), an unknown payment, the first message again and a
/// second message for the paid payment (duplicates), and one whose order
/// branch was cancelled under a `started` log (inconsistent: nothing
/// kept); each answered as it would be alone. Then the refund, recovery,
/// the consumer's redeliveries and a burst through the grouped consumer
/// all end consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_settle_group_answers_each_item_as_it_would_alone() {
    let _serial = fail::FailScenario::setup();
    let mut c = Ctx::start(40, PaymentMode::Message).await;
    // The api's consumer (and refund relay) stopped: the wallet's own
    // messages wait in the queue until it runs again, so only this test
    // settles.
    drop(std::mem::take(&mut c.messaging));
    c.wallet.credit(&[1, 2, 3], 10_000).await;
    let ids = c.orders(&[1, 2, 3]).await;
    let held = |user: u64, order: &str| PayTx {
        tx_id: new_tx_id(),
        order_id: order.to_string(),
        user_id: user,
        sale_id: c.sale,
        amount_cents: PRICE,
        mode: PaymentMode::Message,
        state: TxState::Started,
        xa_group: None,
    };
    let (paid, given_up, broken) = (held(1, &ids[0]), held(2, &ids[1]), held(3, &ids[2]));
    let wallet_db = &c.wallet.db;
    for tx in [&paid, &given_up, &broken] {
        let hold = c.payments.order_steps().log_and_hold(tx).await.unwrap();
        assert_eq!(hold, HoldOutcome::Held);
    }
    // Given up first (the wallet never asked), then its debit lands anyway.
    message::give_back(&c.payments, &given_up, AbortReason::Timeout)
        .await
        .unwrap();
    for tx in [&paid, &given_up] {
        let debit = seckill_workers::wallet::message::debit(
            wallet_db,
            &tx.tx_id,
            tx.user_id,
            &tx.order_id,
            PRICE,
        )
        .await
        .unwrap();
        assert_eq!(debit, DebitOutcome::Debited);
    }
    // The third's order branch is cancelled while its log says `started`.
    order_branch::cancel(&c.db, &broken.tx_id).await.unwrap();

    let (m1, m2, m_given_up, m_unknown, m_broken) = (
        new_tx_id(),
        new_tx_id(),
        new_tx_id(),
        new_tx_id(),
        new_tx_id(),
    );
    let items = serde_json::json!([
        [paid.tx_id, m1],
        [given_up.tx_id, m_given_up],
        [new_tx_id(), m_unknown],
        [paid.tx_id, m1],
        [paid.tx_id, m2],
        [broken.tx_id, m_broken],
    ]);
    let answer: String = sqlx::query_scalar("CALL order_settle_set(?)")
        .bind(items.to_string())
        .fetch_one(&c.db)
        .await
        .unwrap();
    let outcomes: Vec<String> = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        outcomes[..5],
        ["paid", "given_up", "unknown", "duplicate", "duplicate"]
    );
    assert!(outcomes[5].starts_with("inconsistent: "), "{}", outcomes[5]);
    let consumed =
        |m: &str| format!("SELECT COUNT(*) FROM consumed_messages WHERE message_id = '{m}'");
    for (m, kept) in [
        (&m1, 1),
        (&m2, 1),
        (&m_given_up, 0),
        (&m_unknown, 0),
        (&m_broken, 0),
    ] {
        assert_eq!(count(&c.db, &consumed(m)).await, kept, "{m}");
    }
    let state = |tx: &str| {
        format!(
            "SELECT COUNT(*) FROM pay_transactions WHERE tx_id = '{tx}' AND state = 'committed'"
        )
    };
    assert_eq!(count(&c.db, &state(&paid.tx_id)).await, 1);
    assert_eq!(c.status(&ids[0]).await, "paid");
    assert_eq!(c.status(&ids[1]).await, "unpaid");
    assert_eq!(count(&c.db, "SELECT COUNT(*) FROM outbox").await, 0);

    // The consumer and the refund relay again: the wallet's waiting
    // messages change nothing more (the refund below is sent once).
    c.messaging = c.payments.start_messaging(c.config());
    // The given-up debit through `settle`: refunded once.
    let settled = message::settle(&c.payments, &given_up.tx_id, &m_given_up).await;
    assert_eq!(settled.unwrap(), Settled::Refunded);
    let again = message::settle(&c.payments, &given_up.tx_id, &m_given_up).await;
    assert_eq!(again.unwrap(), Settled::Duplicate);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.balance(2).await != (10_000, 0) {
        assert!(tokio::time::Instant::now() < deadline, "never refunded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Recovery ends the broken one (nothing was debited for it).
    let report = recover_all(&c.payments).await;
    assert_eq!(report.aborted, 1, "{report:?}");
    assert_eq!(c.status(&ids[2]).await, "unpaid");
    assert_eq!(c.balance(3).await, (10_000, 0));

    // A burst of payments settles through the consumer's groups.
    let users: Vec<u64> = (10..40).collect();
    c.wallet.credit(&users, 10_000).await;
    let orders = c.orders(&users).await;
    let pays = users.iter().zip(&orders).map(|(&u, o)| c.pay(u, o));
    for result in futures::future::join_all(pays).await {
        // Accepted: settling, or settled already by the time it answered.
        assert!(
            matches!(result, PayResult::Settling(_) | PayResult::Paid(_)),
            "{result:?}"
        );
    }
    for order in &orders {
        assert_eq!(c.wait_status(order, "paid").await, "paid");
    }
    assert_eq!(c.balance(1).await, (10_000 - PRICE, 0));
    assert_eq!(c.balance(2).await, (10_000, 0));
    c.assert_audits_clean().await;
    c.finish().await;
}

/// Plain groups run as set statements and move what their items would:
/// six payments logged and held, their debits in one group (the fence
/// confirmed, one ledger row each with the balance after it, one outbox
/// message each), their settles in one group (the message consumed, the
/// order paid, the log `committed`). The same groups again are repeats
/// and duplicates that change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_debit_and_settle_groups_run_as_set_statements() {
    let _serial = fail::FailScenario::setup();
    let mut c = Ctx::start(10, PaymentMode::Message).await;
    // Only this test settles (see one_settle_group_answers_each_item_as_it_would_alone).
    drop(std::mem::take(&mut c.messaging));
    let users: Vec<u64> = (1..=6).collect();
    c.wallet.credit(&users, 10_000).await;
    let ids = c.orders(&users).await;
    let txs: Vec<PayTx> = users
        .iter()
        .zip(&ids)
        .map(|(&user, order)| PayTx {
            tx_id: new_tx_id(),
            order_id: order.clone(),
            user_id: user,
            sale_id: c.sale,
            amount_cents: PRICE,
            mode: PaymentMode::Message,
            state: TxState::Started,
            xa_group: None,
        })
        .collect();
    for tx in &txs {
        let hold = c.payments.order_steps().log_and_hold(tx).await.unwrap();
        assert_eq!(hold, HoldOutcome::Held);
    }
    let messages: Vec<message::PaymentMessage> = txs
        .iter()
        .map(|tx| {
            let kind = message::MessageKind::Debited;
            message::PaymentMessage::new(kind, &tx.tx_id, &tx.order_id, tx.user_id, PRICE)
        })
        .collect();
    let debits = serde_json::json!(txs
        .iter()
        .zip(&messages)
        .map(|(tx, m)| serde_json::json!([
            tx.tx_id,
            tx.user_id,
            tx.order_id,
            PRICE,
            m.message_id,
            m.to_json()
        ]))
        .collect::<Vec<_>>());
    let wallet_db = &c.wallet.db;
    let (outcomes, statements) = counted(wallet_db, "wallet_debit_set(?)", &debits).await;
    assert_eq!(outcomes, ["debited"; 6]);
    assert!(
        statements <= SET_STATEMENTS,
        "debits: {statements} statements"
    );
    let settles = serde_json::json!(txs
        .iter()
        .zip(&messages)
        .map(|(tx, m)| serde_json::json!([tx.tx_id, m.message_id]))
        .collect::<Vec<_>>());
    let (outcomes, statements) = counted(&c.db, "order_settle_set(?)", &settles).await;
    assert_eq!(outcomes, ["paid"; 6]);
    assert!(
        statements <= SET_STATEMENTS,
        "settles: {statements} statements"
    );
    let check = |tx: &str, sql: &str| sql.replace("{tx}", tx);
    for (tx, m) in txs.iter().zip(&messages) {
        assert_eq!(c.balance(tx.user_id).await, (10_000 - PRICE, 0));
        assert_eq!(c.status(&tx.order_id).await, "paid");
        let ledger: Vec<(String, i64, i64, i64, Option<String>)> = sqlx::query_as(
            "SELECT CAST(kind AS CHAR), amount_cents, balance_after, frozen_after, order_id \
             FROM wallet_ledger WHERE tx_id = ?",
        )
        .bind(&tx.tx_id)
        .fetch_all(wallet_db)
        .await
        .unwrap();
        let debit = (
            "debit".to_string(),
            PRICE,
            10_000 - PRICE,
            0,
            Some(tx.order_id.clone()),
        );
        assert_eq!(ledger, [debit]);
        for (db, sql) in [
            (wallet_db, "SELECT COUNT(*) FROM outbox WHERE JSON_VALUE(payload, '$.tx_id') = '{tx}'"),
            (wallet_db, "SELECT COUNT(*) FROM tcc_fences WHERE tx_id = '{tx}' AND phase = 'confirm'"),
            (&c.db, "SELECT COUNT(*) FROM pay_transactions WHERE tx_id = '{tx}' AND state = 'committed'"),
            (&c.db, "SELECT COUNT(*) FROM tcc_fences WHERE tx_id = '{tx}' AND phase = 'confirm'"),
            (&c.db, "SELECT COUNT(*) FROM orders o JOIN pay_transactions p ON p.order_id = o.id \
                     WHERE p.tx_id = '{tx}' AND o.paid_at IS NOT NULL"),
        ] {
            assert_eq!(count(db, &check(&tx.tx_id, sql)).await, 1, "{sql} for {}", tx.tx_id);
        }
        let consumed = format!(
            "SELECT COUNT(*) FROM consumed_messages WHERE message_id = '{}'",
            m.message_id
        );
        assert_eq!(count(&c.db, &consumed).await, 1);
    }
    // The same groups again: item by item, and nothing moves.
    let rows = "SELECT (SELECT COUNT(*) FROM wallet_ledger) + (SELECT COUNT(*) FROM outbox)";
    let before = count(wallet_db, rows).await;
    let (outcomes, _) = counted(wallet_db, "wallet_debit_set(?)", &debits).await;
    assert_eq!(outcomes, ["repeat"; 6]);
    let (outcomes, _) = counted(&c.db, "order_settle_set(?)", &settles).await;
    assert_eq!(outcomes, ["duplicate"; 6]);
    assert_eq!(count(wallet_db, rows).await, before);
    assert_eq!(c.balance(1).await, (10_000 - PRICE, 0));
    // The wallet's messages reach the consumer again: duplicates.
    c.messaging = c.payments.start_messaging(c.config());
    let published = "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while count(wallet_db, published).await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.assert_audits_clean().await;
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_at_once_share_wallet_calls_and_each_gets_its_own_answer() {
    let _serial = fail::FailScenario::setup();
    let c = Ctx::start(120, PaymentMode::Message).await;
    pay_at_once_in_batches(&c, 120, "/internal/message/debit").await;
    c.finish().await;
}
