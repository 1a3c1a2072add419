//! The `xa` and `message` payment modes end to end: the real gateway, two
//! apis, a worker and the wallet, configured with `payment.mode`, and
//! `seckillctl demo --pay` paying through the gateway (the message mode
//! answers 202 and the demo waits for the order to settle). The demo's
//! payments audit and `seckillctl audit --payments` must be clean. (The
//! default mode, `tcc`, is what the demo test runs.)

mod support;

use seckill_contracts::config::PaymentMode;
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
        let consumed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM consumed_messages")
            .fetch_one(&db)
            .await
            .unwrap();
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
