//! The buyer flow end to end: the real gateway running the repository's
//! `lua/` rules, two real api processes behind it, real Redis, RabbitMQ and
//! MariaDB (and a real worker where the journey needs orders). Each test
//! has its own database, key prefix and queues.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::{json, Value};
use support::stack::{CuttableLink, Snapshot, Stack, StackOptions};

fn opts() -> StackOptions {
    StackOptions {
        worker: false,
        gateway_amqp_url: None,
        gateway_redis_url: None,
        payment_mode: None,
    }
}

/// Waits until the sale's window has opened as seen by the gateway.
async fn until_open(stack: &Stack, sale_id: u64, user: u64) {
    // A request for an absent path answers 403 once the sale is active
    // and 409 before; the refusal changes nothing.
    let probe = "0".repeat(32);
    for _ in 0..100 {
        let (status, _, _) = stack.seckill(user, &probe, sale_id).await;
        if status == 403 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("sale {sale_id} never opened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_whole_buyer_journey_through_the_gateway() {
    let stack = Stack::start(StackOptions {
        worker: true,
        ..opts()
    })
    .await;
    let sale_id = stack.create_sale(5, 1, 600).await;
    let http = &stack.http;

    // The api's public keys, through the gateway, without a token.
    let jwks = stack.get_json("/.well-known/jwks.json").await;
    assert_eq!(
        jwks["keys"][0]["kid"],
        stack.config.jwt.signing_kid.as_str()
    );

    let (user_id, token) = stack
        .sign_up(&format!("buyer_{}", &stack.env.id[..8]))
        .await;

    let sales = stack.get_json("/api/v1/sales").await;
    assert!(
        sales.as_array().unwrap().iter().any(|s| s["id"] == sale_id),
        "{sales}"
    );

    tokio::time::sleep(Duration::from_millis(1200)).await; // the sale opens
    let resp = http
        .get(stack.url(&format!("/api/v1/sales/{sale_id}/captcha")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/png");
    let png = resp.bytes().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let mut redis = stack.env.redis().await;
    let answer: String = redis
        .get(stack.env.keys().sale(sale_id).captcha(user_id))
        .await
        .unwrap();

    let resp = http
        .post(stack.url(&format!("/api/v1/sales/{sale_id}/path")))
        .bearer_auth(&token)
        .json(&json!({"captcha_answer": answer.parse::<i64>().unwrap()}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let path = resp.json::<Value>().await.unwrap()["path"]
        .as_str()
        .unwrap()
        .to_string();

    let resp = http
        .post(stack.url(&format!("/api/v1/seckill/{path}/{sale_id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let queued: Value = resp.json().await.unwrap();
    assert_eq!(queued["status"], "queued");
    let request_id = queued["request_id"].as_str().unwrap().to_string();

    let mut last = Value::Null;
    for _ in 0..100 {
        last = http
            .get(stack.url(&format!("/api/v1/sales/{sale_id}/result")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if last["status"] == "success" {
            break;
        }
        assert!(
            last["status"] == "queued" || last["status"] == "none",
            "{last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last["status"], "success", "{last}");
    let order_id = last["order_id"].as_str().unwrap();
    let db = stack.env.db().await;
    let (uid, rid, status): (u64, String, String) =
        sqlx::query_as("SELECT user_id, request_id, status FROM orders WHERE id = ?")
            .bind(order_id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(
        (uid, rid.as_str(), status.as_str()),
        (user_id, request_id.as_str(), "unpaid")
    );
    let stock: i64 = redis
        .get(stack.env.keys().sale(sale_id).stock())
        .await
        .unwrap();
    assert_eq!(stock, 4);

    // The same path again: already queued/bought, nothing moves.
    let resp = http
        .post(stack.url(&format!("/api/v1/seckill/{path}/{sale_id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    let stock: i64 = redis
        .get(stack.env.keys().sale(sale_id).stock())
        .await
        .unwrap();
    assert_eq!(stock, 4);
    drop(db);
    stack.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thundering_herd_sells_exactly_the_stock() {
    const STOCK: i64 = 100;
    const FAIR: u64 = 2_000;
    const GREEDY: u64 = 200;
    const GREEDY_SHOTS: usize = 20;
    let stack = Arc::new(Stack::start(opts()).await);
    let sale_id = stack.create_sale(STOCK as u32, 1, 600).await;
    let mut paths = HashMap::new();
    for user in 1..=FAIR + GREEDY {
        paths.insert(user, stack.issue_path(sale_id, user).await);
    }
    until_open(&stack, sale_id, 999_999).await;

    // Every request at once (bounded only by the client's connections).
    let limit = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::new();
    for user in 1..=FAIR + GREEDY {
        let shots = if user > FAIR { GREEDY_SHOTS } else { 1 };
        for _ in 0..shots {
            let stack = stack.clone();
            let path = paths[&user].clone();
            let limit = limit.clone();
            tasks.push(tokio::spawn(async move {
                let _slot = limit.acquire().await.unwrap();
                let (status, headers, body) = stack.seckill(user, &path, sale_id).await;
                (user, status, headers, body)
            }));
        }
    }
    let mut admitted_users = Vec::new();
    let mut request_ids = HashSet::new();
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for t in tasks {
        let (user, status, headers, body) = t.await.unwrap();
        *by_status.entry(status).or_default() += 1;
        match status {
            202 => {
                admitted_users.push(user);
                assert!(request_ids.insert(body["request_id"].as_str().unwrap().to_string()));
            }
            // Sold out, duplicate, or over the per-user limit.
            410 | 409 => {}
            429 => assert!(headers.contains_key("retry-after"), "{body}"),
            other => panic!("unexpected {other}: {body}"),
        }
        assert!(
            status == 202 || body["type"].is_string(),
            "problem+json for every refusal: {body}"
        );
    }
    eprintln!("herd outcomes: {by_status:?}");
    // Each proxy thread kept to its own Lua VM through the whole herd.
    let metrics = stack.gateway.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "gateway_lua_vm_foreign_polls_total 0"),
        "a rule call was polled off its VM's thread: {:?}",
        metrics
            .lines()
            .find(|l| l.starts_with("gateway_lua_vm_foreign_polls_total"))
    );
    assert_eq!(
        admitted_users.len() as i64,
        STOCK,
        "exactly the stock admitted"
    );
    let distinct: HashSet<u64> = admitted_users.iter().copied().collect();
    assert_eq!(distinct.len() as i64, STOCK, "one admission per user");

    let snap = stack.snapshot(sale_id).await;
    assert_eq!(snap.stock, Some(0));
    assert_eq!(snap.queued as i64, STOCK, "one message per admission");
    let resv_users: HashSet<u64> = snap
        .reservations
        .iter()
        .map(|(u, _)| u.parse().unwrap())
        .collect();
    assert_eq!(
        resv_users, distinct,
        "reservations only for admitted requests"
    );
    for (_, v) in &snap.reservations {
        let rid = v.split(':').next().unwrap();
        assert!(
            request_ids.contains(rid),
            "reservation {v} of a refused request"
        );
    }
    let buyers: HashSet<u64> = snap.buyers.iter().map(|u| u.parse().unwrap()).collect();
    assert_eq!(buyers, distinct);
    // A greedy user holds at most one reservation: the sets above are
    // keyed by user, and the stock moved by exactly the admissions.
    match Arc::try_unwrap(stack) {
        Ok(s) => s.cleanup().await,
        Err(_) => panic!("stack still shared"),
    }
}

/// After a sell-out the gateway's local sold-out state must not depend on
/// which requests arrive: once its mark has aged out, a bad path is told
/// "sold out" (the sale's public state) and renews the mark, so a stream of
/// bad paths does not reach Redis on every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_paths_after_a_sell_out_renew_the_local_sold_out_mark() {
    let stack = Stack::start(opts()).await;
    let sale_id = stack.create_sale(1, 1, 600).await;
    let (alice, bob) = (31u64, 32u64);
    let path = stack.issue_path(sale_id, alice).await;
    until_open(&stack, sale_id, bob).await;
    let (s, _, b) = stack.seckill(alice, &path, sale_id).await;
    assert_eq!(s, 202, "{b}");
    // Let the mark and the stored answer from the sell-out age out.
    let aged = stack.config.gateway.sold_out_mark_ttl_ms + 600;
    tokio::time::sleep(Duration::from_millis(aged)).await;

    let bad = "f".repeat(32);
    let shortcuts = || async { shortcut_count(&stack).await };
    let (s, _, b) = stack.seckill(bob, &bad, sale_id).await;
    assert_eq!(s, 410, "a bad path after the sell-out: {b}");
    let before = shortcuts().await;
    for _ in 0..20 {
        let (s, _, _) = stack.seckill(bob, &bad, sale_id).await;
        assert_eq!(s, 410);
    }
    assert_eq!(
        shortcuts().await - before,
        20,
        "answered by the gateway, not Redis"
    );
    let snap = stack.snapshot(sale_id).await;
    assert_eq!(snap.stock, Some(0));
    assert_eq!(snap.buyers, [alice.to_string()], "nothing else moved");
    stack.cleanup().await;
}

async fn shortcut_count(stack: &Stack) -> u64 {
    let text = stack.gateway.metrics().await;
    text.lines()
        .filter(|l| l.starts_with("gateway_rule_shortcuts_total{") && l.contains("seckill"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_error_row_is_a_clear_4xx_that_changes_nothing() {
    let stack = Stack::start(opts()).await;
    let sale_id = stack.create_sale(10, 1, 600).await;
    let upcoming = stack.create_sale(10, 3600, 600).await;
    let ended = stack.create_sale(10, -7200, 3600).await;
    let http = &stack.http;
    let alice = 11u64;
    let bob = 12u64;
    let alice_path = stack.issue_path(sale_id, alice).await;
    until_open(&stack, sale_id, 1).await;
    let before = stack.snapshot(sale_id).await;

    let check = |what: &'static str, status: u16, want: u16, body: &Value| {
        assert_eq!(status, want, "{what}: {body}");
        assert_eq!(body["status"], want, "{what}: problem+json {body}");
        assert!(
            body["title"].is_string() && body["detail"].is_string(),
            "{what}: {body}"
        );
    };

    // 403: a wrong path, someone else's path, a malformed path, an expired path.
    let (s, _, b) = stack.seckill(alice, &"ab".repeat(16), sale_id).await;
    check("wrong path", s, 403, &b);
    let (s, _, b) = stack.seckill(bob, &alice_path, sale_id).await;
    check("other user's path", s, 403, &b);
    let (s, _, b) = stack.seckill(alice, "../../etc/passwd", sale_id).await;
    assert!(s == 403 || s == 404, "hostile path {s}: {b}");
    let (s, _, b) = stack.seckill(alice, "'%20OR%201=1--", sale_id).await;
    assert!(s == 403 || s == 404, "SQL-looking path {s}: {b}");
    let carol = 13u64;
    let carol_path = stack.issue_path(sale_id, carol).await;
    let mut redis = stack.env.redis().await;
    let _: () = redis
        .del(stack.env.keys().sale(sale_id).path(carol))
        .await
        .unwrap();
    let (s, _, b) = stack.seckill(carol, &carol_path, sale_id).await;
    check("expired path", s, 403, &b);

    // 409 not started / ended, 404 unknown sale (also a non-numeric id).
    let p = stack.issue_path(upcoming, alice).await;
    let (s, _, b) = stack.seckill(alice, &p, upcoming).await;
    check("not started", s, 409, &b);
    let p = stack.issue_path(ended, alice).await;
    let (s, _, b) = stack.seckill(alice, &p, ended).await;
    check("ended", s, 409, &b);
    let (s, _, b) = stack.seckill(alice, &alice_path, 987_654_321).await;
    check("unknown sale", s, 404, &b);
    let resp = http
        .post(stack.url(&format!("/api/v1/seckill/{alice_path}/1%20OR%201")))
        .bearer_auth(stack.gateway.token(alice))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    // 401: no token, a garbage token.
    let resp = http
        .post(stack.url(&format!("/api/v1/seckill/{alice_path}/{sale_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().contains_key("www-authenticate"));
    let resp = http
        .post(stack.url(&format!("/api/v1/seckill/{alice_path}/{sale_id}")))
        .bearer_auth("not.a.jwt")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // 400: malformed JSON and a wrong captcha (which spends it).
    let token = stack.gateway.token(alice);
    let resp = http
        .post(stack.url(&format!("/api/v1/sales/{sale_id}/path")))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{\"captcha_answer\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = http
        .get(stack.url(&format!("/api/v1/sales/{sale_id}/captcha")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let answer: String = redis
        .get(stack.env.keys().sale(sale_id).captcha(alice))
        .await
        .unwrap();
    let wrong = answer.parse::<i64>().unwrap() + 1;
    for (try_answer, what) in [(wrong, "wrong captcha"), (wrong - 1, "spent captcha")] {
        let resp = http
            .post(stack.url(&format!("/api/v1/sales/{sale_id}/path")))
            .bearer_auth(&token)
            .json(&json!({ "captcha_answer": try_answer }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{what}");
    }
    // The path issued before is still the only one.
    let still: String = redis
        .get(stack.env.keys().sale(sale_id).path(alice))
        .await
        .unwrap();
    assert_eq!(still, alice_path);

    assert_eq!(
        stack.snapshot(sale_id).await,
        before,
        "refusals changed nothing"
    );

    // 429 with Retry-After: one admission, then duplicates, then the limit.
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..8 {
        let (s, h, _) = stack.seckill(alice, &alice_path, sale_id).await;
        if s == 429 {
            retry_after = h.get("retry-after").cloned();
        }
        statuses.push(s);
    }
    assert_eq!(statuses[0], 202, "{statuses:?}");
    assert!(
        statuses[1..].iter().all(|s| *s == 409 || *s == 429),
        "{statuses:?}"
    );
    assert!(statuses.contains(&429), "{statuses:?}");
    let secs: u64 = retry_after.unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&secs));
    let after = stack.snapshot(sale_id).await;
    assert_eq!(after.stock, before.stock.map(|s| s - 1), "one unit moved");
    assert_eq!(after.queued, before.queued + 1, "one message");
    stack.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_down_answers_503_and_restores_stock_and_reservations_exactly() {
    let env_probe = seckill_contracts::testkit::TestEnv::new().await;
    let link = CuttableLink::start(&env_probe.config.amqp.url).await;
    env_probe.cleanup().await;
    let stack = Stack::start(StackOptions {
        gateway_amqp_url: Some(link.url.clone()),
        ..opts()
    })
    .await;
    let sale_id = stack.create_sale(50, 1, 600).await;
    let mut paths = HashMap::new();
    for user in 1..=40u64 {
        paths.insert(user, stack.issue_path(sale_id, user).await);
    }
    until_open(&stack, sale_id, 9_999).await;

    // The broker works: ten buyers admitted and queued.
    for user in 1..=10u64 {
        let (s, _, b) = stack.seckill(user, &paths[&user], sale_id).await;
        assert_eq!(s, 202, "{b}");
    }
    let before = stack.snapshot(sale_id).await;
    assert_eq!(before.stock, Some(40));
    assert_eq!(before.queued, 10);

    assert_eq!(broker_health(&stack).await, ("connected".into(), 1));

    // The broker dies mid-sale.
    link.cut();
    for user in 11..=40u64 {
        let (s, h, b) = stack.seckill(user, &paths[&user], sale_id).await;
        assert_eq!(s, 503, "user {user}: {b}");
        assert!(h.contains_key("retry-after"));
    }
    let after = stack.snapshot(sale_id).await;
    assert_eq!(
        after, before,
        "stock, buyers and reservations restored exactly"
    );
    // The rolled-back requests are remembered for the worker.
    let mut redis = stack.env.redis().await;
    let released: i64 = redis
        .scard(stack.env.keys().sale(sale_id).released())
        .await
        .unwrap();
    assert_eq!(released, 30);
    // A refused buyer may try again once the broker is back (not here):
    // their marker is gone, so the retry is not a "duplicate".
    let (s, _, b) = stack.seckill(11, &paths[&11], sale_id).await;
    assert_eq!(s, 503, "still down: {b}");
    // The gateway itself stays healthy (it still proxies everything else)
    // and says what its broker link is doing.
    assert_eq!(broker_health(&stack).await, ("reconnecting".into(), 0));

    // Ops see every publish's wait and outcome: 10 confirmed, 31 failed.
    let counts = publish_counts(&stack.gateway.metrics().await);
    assert_eq!(counts.get("confirmed"), Some(&10), "{counts:?}");
    let failed: u64 = counts
        .iter()
        .filter(|(outcome, _)| *outcome != "confirmed")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(failed, 31, "{counts:?}");
    stack.cleanup().await;
}

/// A broker behind a dead route (SYNs answered by nobody) must cost the
/// buyer a 503 with the unit given back, never a cut rule call: the
/// publish, its first connect included, only gets what the call has left
/// minus the rollback reserve.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn black_holed_broker_answers_503_and_gives_the_unit_back() {
    let env_probe = seckill_contracts::testkit::TestEnv::new().await;
    let link = CuttableLink::start(&env_probe.config.amqp.url).await;
    env_probe.cleanup().await;
    link.black_hole(true);
    let stack = Stack::start(StackOptions {
        gateway_amqp_url: Some(link.url.clone()),
        ..opts()
    })
    .await;
    let sale_id = stack.create_sale(5, 1, 600).await;
    let path = stack.issue_path(sale_id, 1).await;
    until_open(&stack, sale_id, 9_999).await;
    let before = stack.snapshot(sale_id).await;

    // The gateway's first publish connects into the black hole.
    let started = std::time::Instant::now();
    let (s, h, b) = stack.seckill(1, &path, sale_id).await;
    let took = started.elapsed();
    assert_eq!(s, 503, "{b}");
    assert_eq!(h.get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
    let detail = b["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("nothing was reserved"), "{b}");
    let limit = Duration::from_millis(stack.config.gateway.lua_call_timeout_ms);
    assert!(
        took < limit,
        "answered in {took:?}, within the call's {limit:?}"
    );
    assert_eq!(
        stack.snapshot(sale_id).await,
        before,
        "unit and buyer given back"
    );

    // A retry is admitted again (not "already queued"), and once the route
    // to the broker is back, it goes through.
    link.black_hole(false);
    let mut last = (0, Value::Null);
    for _ in 0..60 {
        let (s, _, b) = stack.seckill(1, &path, sale_id).await;
        assert_ne!(s, 409, "a retry must not be refused as a duplicate: {b}");
        last = (s, b);
        if s == 202 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(last.0, 202, "{}", last.1);
    let after = stack.snapshot(sale_id).await;
    assert_eq!(after.stock, before.stock.map(|s| s - 1));
    assert_eq!(after.queued, 1);
    stack.cleanup().await;
}

/// A Redis that stops answering mid-sale (the host of the sale's master
/// gone, a failover under way) must cost buyers a 503 with `Retry-After`
/// before the rule call's limit, never a 500 from a cut call: both the
/// admission script and the re-read of the gateway's sale copy are bounded.
/// Nothing is admitted meanwhile, and once Redis answers again the sale goes
/// on where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_redis_answers_503_within_the_call_and_the_sale_goes_on() {
    let env_probe = seckill_contracts::testkit::TestEnv::new().await;
    let redis_url = env_probe.config.redis.url.clone();
    env_probe.cleanup().await;
    let host_port = redis_url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .and_then(|authority| authority.rsplit('@').next())
        .expect("host:port in redis.url")
        .to_string();
    let link = CuttableLink::tcp(&host_port).await;
    let stack = Stack::start(StackOptions {
        gateway_redis_url: Some(format!("redis://{}/", link.addr)),
        payment_mode: None,
        ..opts()
    })
    .await;
    let sale_id = stack.create_sale(5, 1, 600).await;
    let mut paths = HashMap::new();
    for user in 1..=3u64 {
        paths.insert(user, stack.issue_path(sale_id, user).await);
    }
    until_open(&stack, sale_id, 9_999).await;
    let (s, _, b) = stack.seckill(1, &paths[&1], sale_id).await;
    assert_eq!(s, 202, "{b}");
    let before = stack.snapshot(sale_id).await;

    link.stall(true);
    let limit = Duration::from_millis(stack.config.gateway.lua_call_timeout_ms);
    let ttl = Duration::from_millis(stack.config.gateway.sale_info_ttl_ms);
    // The first attempt finds the sale copy fresh and stalls in the
    // admission script; the second, after the copy's TTL, stalls re-reading
    // it. Either way: a 503 to retry, in time.
    for attempt in 0..2 {
        let started = std::time::Instant::now();
        let (s, h, b) = stack.seckill(2, &paths[&2], sale_id).await;
        let took = started.elapsed();
        assert_eq!(s, 503, "attempt {attempt}: {b}");
        assert_eq!(h.get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
        assert!(
            took < limit,
            "answered in {took:?}, within the call's {limit:?}"
        );
        tokio::time::sleep(ttl).await;
    }
    assert_eq!(stack.snapshot(sale_id).await, before, "nothing moved");
    let metrics = stack.gateway.metrics().await;
    assert!(
        metrics.contains("outcome=\"store_unavailable\"} 2"),
        "two store_unavailable decisions counted"
    );

    // Redis answers again: the stalled connection is dropped, the gateway
    // reconnects and the buyer who was refused gets the unit.
    link.stall(false);
    let mut last = (0, Value::Null);
    for _ in 0..60 {
        let (s, _, b) = stack.seckill(2, &paths[&2], sale_id).await;
        last = (s, b);
        if s != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(last.0, 202, "{}", last.1);
    let after = stack.snapshot(sale_id).await;
    assert_eq!(after.stock, before.stock.map(|s| s - 1));
    assert_eq!(after.queued, before.queued + 1);
    stack.cleanup().await;
}

/// The broker state `/healthz` reports and the `gateway_broker_connected` gauge.
async fn broker_health(stack: &Stack) -> (String, i64) {
    let r = stack.http.get(stack.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let gauge = stack
        .gateway
        .metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix("gateway_broker_connected "))
        .and_then(|v| v.trim().parse().ok())
        .expect("gateway_broker_connected in /metrics");
    (
        body["broker"].as_str().unwrap_or_default().to_string(),
        gauge,
    )
}

/// `gateway_publish_confirm_seconds_count` by outcome, from `/metrics`.
fn publish_counts(metrics: &str) -> HashMap<String, u64> {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix("gateway_publish_confirm_seconds_count{outcome=\""))
        .filter_map(|rest| {
            let (outcome, value) = rest.split_once("\"} ")?;
            Some((outcome.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sale_keys_deleted_mid_sale_fail_closed() {
    let stack = Stack::start(opts()).await;
    let sale_id = stack.create_sale(20, 1, 600).await;
    let mut paths = HashMap::new();
    for user in 1..=20u64 {
        paths.insert(user, stack.issue_path(sale_id, user).await);
    }
    until_open(&stack, sale_id, 9_999).await;
    for user in 1..=5u64 {
        let (s, _, b) = stack.seckill(user, &paths[&user], sale_id).await;
        assert_eq!(s, 202, "{b}");
    }
    let k = stack.env.keys().sale(sale_id);
    let mut redis = stack.env.redis().await;

    // Redis loses the sale's hot state (a restart without persistence).
    let _: () = redis.del(&[k.info(), k.stock()]).await.unwrap();
    for user in 6..=20u64 {
        let (s, _, b) = stack.seckill(user, &paths[&user], sale_id).await;
        assert_eq!(s, 503, "user {user} must not be admitted blind: {b}");
    }
    // Only the stock counter gone: still refused, never recreated by admission.
    let _: () = redis.hset(k.info(), "starts_at_ms", 0).await.unwrap();
    let _: () = redis.hset(k.info(), "ends_at_ms", i64::MAX).await.unwrap();
    let _: () = redis.hset(k.info(), "stock_total", 20).await.unwrap();
    let (s, _, b) = stack.seckill(6, &paths[&6], sale_id).await;
    assert_eq!(s, 503, "{b}");
    let snap: Snapshot = stack.snapshot(sale_id).await;
    assert_eq!(snap.stock, None, "admission never recreates stock");
    assert_eq!(snap.queued, 5, "nothing published after the keys vanished");
    assert_eq!(snap.buyers.len(), 5);
    stack.cleanup().await;
}
