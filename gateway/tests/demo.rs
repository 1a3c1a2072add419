//! `seckillctl demo` end to end: the real CLI binary drives simulated buyers
//! through the real gateway, two api instances and a worker (captcha, hidden
//! path, seckill, result polling), and its report must match what MySQL and
//! Redis hold afterwards.

mod support;

use redis::AsyncCommands;
use support::stack::{run_demo, Stack, StackOptions};

const BUYERS: u64 = 300;
const STOCK: u64 = 30;
/// Buyers who send several attempts at once (a bot): still one unit each.
const GREEDY: u64 = 30;
const GREEDY_ATTEMPTS: u64 = 5;

#[tokio::test]
async fn demo_sells_exactly_the_stock_and_audits_clean() {
    let stack = Stack::start(StackOptions {
        worker: true,
        gateway_amqp_url: None,
        gateway_redis_url: None,
        payment_mode: None,
    })
    .await;
    let (buyers, stock) = (BUYERS.to_string(), STOCK.to_string());
    let (greedy, attempts) = (GREEDY.to_string(), GREEDY_ATTEMPTS.to_string());
    let report = run_demo(
        &stack.config_path,
        &[
            "--buyers",
            &buyers,
            "--stock",
            &stock,
            "--concurrency",
            "100",
            "--timeout",
            "60s",
            "--greedy",
            &greedy,
            "--greedy-attempts",
            &attempts,
        ],
    )
    .await;

    assert_eq!(report["ok"], true);
    assert_eq!(report["buyers"], BUYERS);
    assert_eq!(report["stock_at_start"], STOCK);
    assert_eq!(report["admitted"], STOCK, "exactly the stock admitted");
    assert_eq!(report["greedy"], GREEDY);
    assert_eq!(report["admitted_twice"], 0, "no buyer admitted twice");
    assert_eq!(report["sold"], STOCK);
    assert_eq!(report["failed"], 0);
    assert_eq!(report["unsettled"], 0);
    assert!(report["sold_out_after_ms"].is_u64(), "the sale sold out");
    let rejected: u64 = report["rejected"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    let attempts = BUYERS + GREEDY * (GREEDY_ATTEMPTS - 1);
    assert_eq!(
        rejected,
        attempts - STOCK,
        "every other attempt got a final answer"
    );
    assert!(
        report["rejected"]["410 sold out"].as_u64().unwrap_or(0) > 0,
        "late buyers saw sold out: {}",
        report["rejected"]
    );
    assert_eq!(report["audit"]["ok"], true);
    // Ten buyers topped up and paid, and the money adds up.
    assert_eq!(report["paid"], 10, "{}", report["pay_refused"]);
    assert_eq!(
        report["payments_audit"]["ok"], true,
        "{}",
        report["payments_audit"]
    );
    assert_eq!(report["payments_audit"]["paid_orders"], 10);

    // The report against the stores themselves.
    let sale_id = report["sale_id"].as_u64().unwrap();
    let db = stack.env.db().await;
    let (orders, users): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT user_id) FROM orders WHERE sale_id = ?")
            .bind(sale_id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!((orders, users), (STOCK as i64, STOCK as i64));
    assert_eq!(report["orders_committed"], orders);
    let left: i64 = sqlx::query_scalar("SELECT CAST(stock_left AS SIGNED) FROM sales WHERE id = ?")
        .bind(sale_id)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(left, 0);
    let mut redis = stack.env.redis().await;
    let stock: Option<i64> = redis
        .get(stack.env.keys().sale(sale_id).stock())
        .await
        .unwrap();
    assert_eq!(stock, Some(0));
    stack.cleanup().await;
}
