//! The `xa` and `message` payment modes end to end: the real gateway, two
//! apis, a worker and the wallet, configured with `payment.mode`, and
//! `seckillctl demo --pay` paying through the gateway (the message mode
//! answers 202 and the demo waits for the order to settle). The demo's
//! payments audit and `seckillctl audit --payments` must be clean. (The
//! default mode, `tcc`, is what the demo test runs.) And in every mode,
//! the real wallet binary killed with `kill -9` while buyers pay: once it
//! is back, every payment ends one way or the other and money is
//! conserved (SPEC invariant 7).

mod support;

use std::time::Duration;

use seckill_contracts::config::PaymentMode;
use serde_json::Value;
use support::stack::{run_demo, seckillctl, Stack, StackOptions};

const BUYERS: u64 = 60;
const STOCK: u64 = 20;
const PAYING: u64 = 15;

async fn demo_pays_in(mode: PaymentMode) {
    let stack = Stack::start(StackOptions {
        worker: true,
        gateway_amqp_url: None,
        gateway_redis_url: None,
        payment_mode: Some(mode),
    })
    .await;
    let (buyers, stock, paying) = (BUYERS.to_string(), STOCK.to_string(), PAYING.to_string());
    let report = run_demo(
        &stack.config_path,
        &[
            "--buyers",
            &buyers,
            "--stock",
            &stock,
            "--pay",
            &paying,
            "--concurrency",
            "30",
            "--timeout",
            "60s",
        ],
    )
    .await;
    assert_eq!(report["sold"], STOCK);
    assert_eq!(
        report["paid"], PAYING,
        "{mode:?}: {}",
        report["pay_refused"]
    );
    assert_eq!(
        report["payments_audit"]["ok"], true,
        "{}",
        report["payments_audit"]
    );
    assert_eq!(report["payments_audit"]["paid_orders"], PAYING);

    let (ok, audit) = seckillctl(&stack.config_path, &["audit", "--payments"]).await;
    assert!(ok, "{mode:?}: {audit}");
    // The modes leave their own traces: every transaction logged in this
    // mode, and (message) one consumed message per paid order.
    let db = stack.env.db().await;
    let logged: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM pay_transactions WHERE mode = ? AND state = 'committed'",
    )
    .bind(mode.as_str())
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(logged, PAYING as i64);
    if mode == PaymentMode::Message {
        let consumed = count(&db, "SELECT COUNT(*) FROM consumed_messages").await;
        assert!(consumed >= PAYING as i64, "{consumed} messages consumed");
    }
    stack.cleanup().await;
}

#[tokio::test]
async fn the_demo_pays_in_xa_mode_through_the_real_binaries() {
    demo_pays_in(PaymentMode::Xa).await;
}

#[tokio::test]
async fn the_demo_pays_in_message_mode_through_the_real_binaries() {
    demo_pays_in(PaymentMode::Message).await;
}

/// Pays `order` with `token` through the gateway at `base` with a fresh
/// idempotency key → the answer's status (0 when no answer came at all).
async fn pay(http: reqwest::Client, base: String, token: String, order: String) -> u16 {
    let key = match http
        .get(format!("{base}/api/v1/idempotency-key"))
        .bearer_auth(&token)
        .send()
        .await
    {
        Ok(r) => r.json::<Value>().await.unwrap_or_default()["key"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        Err(_) => return 0,
    };
    match http
        .post(format!("{base}/api/v1/orders/{order}/pay"))
        .bearer_auth(&token)
        .header("Idempotency-Key", key)
        .timeout(Duration::from_secs(30))
        .send()
        .await
    {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

async fn count(db: &sqlx::MySqlPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db).await.unwrap()
}

/// How many of `tx_ids`' wallet branches the server holds prepared
/// (`XA RECOVER` lists the whole server's).
async fn prepared_wallet_branches(db: &sqlx::MySqlPool, groups: &[String]) -> usize {
    use sqlx::{Executor, Row};
    let rows = db.fetch_all(sqlx::raw_sql("XA RECOVER")).await.unwrap();
    rows.iter()
        .filter(|row| {
            let gtrid_len: i64 = row.try_get(1).unwrap();
            let data: Vec<u8> = row.try_get(3).unwrap();
            let split = usize::try_from(gtrid_len)
                .unwrap_or(usize::MAX)
                .min(data.len());
            let (gtrid, bqual) = data.split_at(split);
            bqual == b"wallet" && groups.iter().any(|g| g.as_bytes() == gtrid)
        })
        .count()
}

async fn the_wallet_killed_mid_payment_ends_consistent(mode: PaymentMode) {
    const SOLD: u64 = 40;
    let mut stack = Stack::start(StackOptions {
        worker: true,
        gateway_amqp_url: None,
        gateway_redis_url: None,
        payment_mode: Some(mode),
    })
    .await;
    let (buyers, stock) = ((SOLD * 2).to_string(), SOLD.to_string());
    let report = run_demo(
        &stack.config_path,
        &[
            "--buyers",
            &buyers,
            "--stock",
            &stock,
            "--pay",
            "0",
            "--timeout",
            "60s",
        ],
    )
    .await;
    assert_eq!(report["sold"], SOLD);
    let db = stack.env.db().await;
    let orders: Vec<(String, u64)> =
        sqlx::query_as("SELECT id, user_id FROM orders WHERE status = 'unpaid'")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(orders.len() as u64, SOLD);
    for (_, user) in &orders {
        stack.credit(*user, 1_000_000).await;
    }
    let (ok, before) = seckillctl(&stack.config_path, &["audit", "--payments"]).await;
    assert!(ok, "{before}");

    // Everyone pays at once; the wallet dies once payments are under way.
    let payers: Vec<_> = orders
        .iter()
        .map(|(order, user)| {
            let (http, base) = (stack.http.clone(), stack.url(""));
            tokio::spawn(pay(http, base, stack.token(*user), order.clone()))
        })
        .collect();
    // XA: not before a wallet branch is prepared, the case that needs
    // the restarted wallet to find and end what the dead one left.
    let under_way = async {
        loop {
            // XA branches are named by their payment group.
            let logged: Vec<String> =
                sqlx::query_scalar("SELECT COALESCE(xa_group, tx_id) FROM pay_transactions")
                    .fetch_all(&db)
                    .await
                    .unwrap();
            let prepared = if mode == PaymentMode::Xa {
                prepared_wallet_branches(&db, &logged).await
            } else {
                1
            };
            if logged.len() >= 5 && prepared >= 1 {
                return (logged.len(), prepared);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let logged = tokio::time::timeout(Duration::from_secs(30), under_way)
        .await
        .expect("no payment began");
    stack.wallet.signal("KILL");
    let mut answers = std::collections::BTreeMap::new();
    let mut answered_paid = Vec::new();
    for ((order, _), p) in orders.iter().zip(payers) {
        let status = p.await.unwrap();
        *answers.entry(status).or_insert(0) += 1;
        if status == 200 {
            answered_paid.push(order.clone());
        }
    }
    // The wallet's outage is a 503 (or a 202 to poll, message mode), never
    // an internal error.
    assert!(
        answers.keys().all(|s| [200, 202, 503].contains(s)),
        "{mode:?}: {answers:?}"
    );
    eprintln!(
        "{mode:?}: wallet killed after {} payments logged ({} wallet branches prepared); answers {answers:?}",
        logged.0, logged.1
    );
    stack.kill_and_restart_wallet().await;

    // Recovery ends every payment, and the audits come back clean.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let audit = loop {
        let (ok, audit) = seckillctl(&stack.config_path, &["audit", "--payments"]).await;
        let open = count(
            &db,
            "SELECT COUNT(*) FROM pay_transactions WHERE state NOT IN ('committed', 'aborted')",
        )
        .await;
        if ok && open == 0 {
            break audit;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{mode:?}: {open} payments still open, audit {audit}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let paying = count(&db, "SELECT COUNT(*) FROM orders WHERE status = 'paying'").await;
    assert_eq!(paying, 0, "{mode:?}: {audit}");
    let paid = count(&db, "SELECT COUNT(*) FROM orders WHERE status = 'paid'").await;
    for order in &answered_paid {
        let status: String =
            sqlx::query_scalar("SELECT CAST(status AS CHAR) FROM orders WHERE id = ?")
                .bind(order)
                .fetch_one(&db)
                .await
                .unwrap();
        assert_eq!(status, "paid", "{mode:?}: {order} was answered 200");
    }
    eprintln!("{mode:?}: {paid} of {SOLD} paid after the wallet's kill; audit {audit}");
    stack.cleanup().await;
}

#[tokio::test]
async fn the_wallet_killed_mid_payment_ends_consistent_in_tcc_mode() {
    the_wallet_killed_mid_payment_ends_consistent(PaymentMode::Tcc).await;
}

#[tokio::test]
async fn the_wallet_killed_mid_payment_ends_consistent_in_xa_mode() {
    the_wallet_killed_mid_payment_ends_consistent(PaymentMode::Xa).await;
}

#[tokio::test]
async fn the_wallet_killed_mid_payment_ends_consistent_in_message_mode() {
    the_wallet_killed_mid_payment_ends_consistent(PaymentMode::Message).await;
}
