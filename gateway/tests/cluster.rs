//! Scale-out on real engines (SPEC §6), on the topology `scripts/cluster up`
//! builds: two gateways behind two keepalived VIPs, two api + worker hosts,
//! a 3-master Redis Cluster with replicas, a 3-node RabbitMQ cluster with
//! quorum queues, MariaDB on its own host. Each test drives buyers through
//! the VIPs, breaks one thing, and ends with `seckillctl audit` clean; each
//! prints its figures (`--nocapture`).
//!
//! ```text
//! herd              two sales on two Redis masters, 3,000 buyers through both VIPs
//! VIP holder        kill -9 of edge-1's gateway and keepalived mid-sale
//! Redis master      kill -9 of the master of the sale's slot mid-sale
//! broker node       kill -9 of the RabbitMQ node edge-1 publishes to
//! app host cut      app-1's link down while its worker holds deliveries
//! rolling restart   gateways upgraded in place, then workers and apis
//! ```
//!
//! Run with `scripts/cluster test` (root: it builds the namespaces and the
//! release binaries first and sets `SECKILL_CLUSTER=1`); anywhere else
//! these tests skip.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use seckill_contracts::admission_answers::answer_for;
use serde_json::Value;
use support::cluster::{
    enabled, kill_9, master_of_slot, metric, set_link, signal, vip_holder, vip_url, Cluster, EDGES,
    VIPS,
};

/// Units of each sale in the herd test, and buyers per sale (plus the
/// greedy ones among them, who send several attempts at once).
const HERD_STOCK: u32 = 400;
const HERD_BUYERS: u64 = 1_500;
const HERD_GREEDY: u64 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn herd_through_both_vips_sells_exactly_the_stock_of_two_sales_on_two_masters() {
    if !enabled("herd") {
        return;
    }
    let c = Cluster::ready().await;
    let (a, b) = two_sales_on_two_masters(&c).await;
    let before = [c.metrics(0).await, c.metrics(1).await];

    // 3,000 buyers at once, half for each sale, each buyer's whole journey
    // (captcha, path, seckill, result) through one of the two VIPs.
    let started = Instant::now();
    let (ra, rb) = tokio::join!(demo(&c, a, 910_000_001), demo(&c, b, 920_000_001));
    let took = started.elapsed();
    for (sale, report) in [(a, &ra), (b, &rb)] {
        assert_eq!(report["ok"], true, "sale {sale}: {report}");
        assert_eq!(report["admitted"], HERD_STOCK, "sale {sale}: {report}");
        assert_eq!(report["sold"], HERD_STOCK, "sale {sale}: {report}");
        assert_eq!(report["failed"], 0, "sale {sale}: {report}");
        assert_eq!(report["admitted_twice"], 0, "sale {sale}: {report}");
        assert_eq!(report["greedy"], HERD_GREEDY);
        // Ten buyers of each sale paid through the VIPs (the wallets of
        // app-1 and app-2, one database), and the money adds up.
        assert_eq!(report["paid"], 10, "sale {sale}: {}", report["pay_refused"]);
        assert_eq!(
            report["payments_audit"]["ok"], true,
            "sale {sale}: {report}"
        );
    }
    let after = [c.metrics(0).await, c.metrics(1).await];

    // Both gateways served the rush.
    let served: Vec<f64> = (0..2)
        .map(|e| {
            let seckill = ["route=\"seckill\""];
            metric(&after[e], "gateway_requests_total", &seckill)
                - metric(&before[e], "gateway_requests_total", &seckill)
        })
        .collect();
    for (e, n) in served.iter().enumerate() {
        assert!(*n > 0.0, "{} served no seckill request", EDGES[e].0);
    }

    // Every sold-out notice reached each gateway within 100 ms.
    let mut delays = Vec::new();
    for e in 0..2 {
        let d = NoticeDelays::between(&before[e], &after[e], "sold_out");
        assert!(d.count >= 1.0, "{} heard no sold-out notice", EDGES[e].0);
        assert_eq!(
            d.within_100ms, d.count,
            "{}: a sold-out notice took over 100 ms: {d:?}",
            EDGES[e].0
        );
        delays.push(d);
    }
    for sale in [a, b] {
        let (ok, audit) = c.audit_until_clean(sale, Duration::from_secs(30)).await;
        assert!(ok, "audit of sale {sale}: {audit}");
    }
    println!(
        "herd: 2 sales x {HERD_STOCK} units on masters {} and {}, {} buyers ({} greedy) in {:.1} s, 10 of each sale paid; \
         seckill requests served: edge-1 {}, edge-2 {}; sold out after {} / {} ms; \
         sold-out notices heard: edge-1 {}, edge-2 {}; audits clean",
        c.master_of(a).await.unwrap_or_default(),
        c.master_of(b).await.unwrap_or_default(),
        2 * HERD_BUYERS,
        2 * HERD_GREEDY,
        took.as_secs_f64(),
        served[0],
        served[1],
        ra["sold_out_after_ms"],
        rb["sold_out_after_ms"],
        delays[0],
        delays[1],
    );
}

/// Units and paced buyers of the VIP failover test.
const FAILOVER_STOCK: u32 = 300;
const FAILOVER_BUYERS: u64 = 700;
const FAILOVER_RATE_PER_SEC: u64 = 40;
/// When the VIP holder is killed, from the first buyer on.
const KILL_AT: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_vip_holder_mid_sale_moves_the_vip_within_3s_and_sells_exactly_the_stock() {
    if !enabled("vip failover") {
        return;
    }
    let c = Cluster::ready().await;
    let sale = c.create_sale(FAILOVER_STOCK).await;
    let buyers = buyers(&c, sale, 930_000_001, FAILOVER_BUYERS).await;
    let vip = VIPS[0];
    assert_eq!(vip_holder(vip).as_deref(), Some("edge-1"));

    // Paced buyers through the VIP; each retries what a buyer's app
    // retries (no answer, 5xx, 429) until it has a final answer.
    let buyers = Running::start(&c, sale, buyers, &[vip]);
    let t0 = buyers.t0;

    // Mid-sale, the edge holding the VIP loses its gateway and keepalived.
    tokio::time::sleep(KILL_AT).await;
    let killed_at = t0.elapsed();
    kill_9("gateway-edge-1");
    kill_9("keepalived-edge-1-vip1");
    kill_9("keepalived-edge-1-vip2");
    let moved_at = loop {
        if vip_holder(vip).as_deref() == Some("edge-2") {
            break t0.elapsed();
        }
        assert!(
            t0.elapsed() < killed_at + Duration::from_secs(10),
            "the VIP never moved"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (rush, attempts) = buyers.finish().await;
    let admitted = rush.admitted.len();

    // Units stranded by the killed gateway (decremented, never published)
    // come back through the sweeper; late buyers take them.
    let late = sell_what_is_left(&c, sale, vip).await;
    let (orders, audit) = assert_sold_exactly(&c, sale, FAILOVER_STOCK).await;
    assert_eq!(audit["redis_stock"], 0, "{audit}");

    let failures: Vec<&Attempt> = attempts.iter().filter(|a| a.failed()).collect();
    let window_end = moved_at + Duration::from_secs(1);
    for f in &failures {
        assert!(
            f.at + Duration::from_millis(500) >= killed_at && f.at <= window_end,
            "a failure outside the failover window ({killed_at:?}..{window_end:?}): {f:?}"
        );
    }
    let took = moved_at - killed_at;
    assert!(
        took <= Duration::from_secs(3),
        "the VIP moved after {took:?}"
    );
    let last_failure = failures.iter().map(|f| f.at).max();
    println!(
        "vip failover: killed edge-1 (gateway + keepalived) at {:.2} s; VIP {vip} on edge-2 {:.2} s later; \
         {} failed attempts of {}, the last {:.2} s after the kill; {admitted} buyers admitted through the VIP, \
         {late} late buyers took stranded units; orders {orders} = stock {FAILOVER_STOCK}; audit clean",
        killed_at.as_secs_f64(),
        took.as_secs_f64(),
        failures.len(),
        attempts.len(),
        last_failure.map_or(0.0, |at| (at - killed_at).as_secs_f64()),
    );
    // Leave the topology as it was for whoever runs next.
    drop(Cluster::ready().await);
}

/// Units and buyers of the Redis master failover test.
const REDIS_STOCK: u32 = 300;
const REDIS_BUYERS: u64 = 700;
/// How long after a replica's promotion a gateway may still refuse: the
/// topology's `redis.cluster_stall_ms` (3 s), a fresh connection, and a
/// buyer's 200 ms retry, with room for two busy cores.
const REDIS_SETTLE: Duration = Duration::from_secs(6);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_sales_redis_master_fails_closed_and_reconcile_heals_the_drift() {
    if !enabled("redis master failover") {
        return;
    }
    let c = Cluster::ready().await;
    let sale = c.create_sale(REDIS_STOCK).await;
    let buyers = buyers(&c, sale, 950_000_001, REDIS_BUYERS).await;
    let master = c.master_of(sale).await.expect("the sale's master");

    let rush = Running::start(&c, sale, buyers, &VIPS);
    let t0 = rush.t0;

    // Mid-sale, the master of the sale's slot dies.
    tokio::time::sleep(KILL_AT).await;
    let killed_at = t0.elapsed();
    kill_9(&redis_process(&master));
    let promoted_at = loop {
        if let Some(m) = c.master_of(sale).await.filter(|m| *m != master) {
            break (t0.elapsed(), m);
        }
        assert!(
            t0.elapsed() < killed_at + Duration::from_secs(30),
            "no replica took over"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (rush, attempts) = rush.finish().await;
    let outcomes = assert_failed_closed(&attempts);
    // Fail closed for the failover, not for ever: once a replica is master,
    // every gateway admits again within the stall watch of its Redis
    // connection (`redis.cluster_stall_ms`) and a buyer's retry.
    let settled_by = promoted_at.0 + REDIS_SETTLE;
    let last_refusal = attempts.iter().filter(|a| a.failed()).map(|a| a.at).max();
    if let Some(last) = last_refusal {
        assert!(
            last <= settled_by,
            "refusals went on {:.2} s after the promotion: {outcomes:?}",
            (last - promoted_at.0).as_secs_f64()
        );
    }

    // Replication is asynchronous: decrements the dead master acknowledged
    // but never sent to its replica are lost. The audit must see any drift
    // between Redis and MySQL, and reconcile must heal it.
    let drifted = c.audit_when_quiet(sale, Duration::from_secs(30)).await;
    let redis_stock = drifted["redis_stock"].as_i64().unwrap_or(-1);
    let mysql_left = drifted["mysql_stock_left"].as_i64().unwrap_or(-1);
    let drift = redis_stock - mysql_left;
    if drift != 0 {
        assert_eq!(
            drifted["ok"], false,
            "the audit must report a drift of {drift}: {drifted}"
        );
    }
    let (ok, healed) = c.ctl(&["reconcile", "--sale", &sale.to_string()]).await;
    assert!(ok, "reconcile: {healed}");
    let late = sell_what_is_left(&c, sale, VIPS[1]).await;
    let (orders, _) = assert_sold_exactly(&c, sale, REDIS_STOCK).await;
    let ordered = order_users(&c, sale).await;
    let late_orders = ordered.len() - ordered.iter().filter(|u| **u < LATE_USERS).count();
    rush.assert_orders(ordered.into_iter().filter(|u| *u < LATE_USERS).collect());
    println!(
        "redis master failover: killed {master} (sale {sale}'s slot) at {:.2} s; {} master {:.2} s later; \
         attempts by answer {outcomes:?}; {} admitted during the run, {} told their order may \
         have been placed, {late} late ({late_orders} late orders); \
         the last refusal {:.2} s after the promotion; \
         drift after the failover: {drift} units (Redis {redis_stock}, MySQL {mysql_left}), \
         healed by reconcile; orders {orders} = stock {REDIS_STOCK}; audit clean",
        killed_at.as_secs_f64(),
        promoted_at.1,
        (promoted_at.0 - killed_at).as_secs_f64(),
        rush.admitted.len(),
        rush.uncertain.len(),
        last_refusal.map_or(0.0, |at| at.as_secs_f64() - promoted_at.0.as_secs_f64()),
    );
    drop(Cluster::ready().await);
}

/// Units and buyers of the broker node failover test.
const BROKER_STOCK: u32 = 300;
const BROKER_BUYERS: u64 = 700;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_broker_node_a_gateway_publishes_to_loses_no_202_and_duplicates_none() {
    if !enabled("broker node failover") {
        return;
    }
    let c = Cluster::ready().await;
    let sale = c.create_sale(BROKER_STOCK).await;
    let buyers = buyers(&c, sale, 960_000_001, BROKER_BUYERS).await;

    let rush = Running::start(&c, sale, buyers, &VIPS);
    let t0 = rush.t0;
    // Mid-sale, mq-1 dies: edge-1 publishes there (its first broker URL)
    // and app-1's worker consumes from it.
    tokio::time::sleep(KILL_AT).await;
    let killed_at = t0.elapsed();
    kill_9("rabbitmq-mq-1");
    let (rush, attempts) = rush.finish().await;
    let outcomes = assert_failed_closed(&attempts);

    // Every 202 is exactly one order; any other order was announced.
    let rush_orders = assert_orders_once_quiet(&c, sale, &rush).await;

    let late = sell_what_is_left(&c, sale, VIPS[1]).await;
    let (orders, _) = assert_sold_exactly(&c, sale, BROKER_STOCK).await;
    let after_kill = attempts.iter().filter(|a| a.at >= killed_at);
    let refused_after_kill = after_kill.filter(|a| a.outcome == Ok(503)).count();
    println!(
        "broker node failover: killed mq-1 at {:.2} s; attempts by answer {outcomes:?} \
         ({refused_after_kill} refusals to retry after the kill); {} 202s, {} told their order may \
         have been placed, {rush_orders} orders: every 202 one order, none duplicated; {late} late \
         buyers; orders {orders} = stock {BROKER_STOCK}; audit clean",
        killed_at.as_secs_f64(),
        rush.admitted.len(),
        rush.uncertain.len(),
    );
    drop(Cluster::ready().await);
}

/// Units and buyers of the rolling restart test: a sale long enough to
/// outlast the restarts of both gateways and both workers.
const ROLLING_STOCK: u32 = 1_200;
const ROLLING_BUYERS: u64 = 1_800;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_gateways_and_workers_under_load_fails_no_202_and_loses_no_order() {
    if !enabled("rolling restart") {
        return;
    }
    let c = Cluster::ready().await;
    let sale = c.create_sale(ROLLING_STOCK).await;
    let buyers = buyers(&c, sale, 970_000_001, ROLLING_BUYERS).await;

    let rush = Running::start(&c, sale, buyers, &VIPS);
    let t0 = rush.t0;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, out) = c.script(&["rolling"]).await;
    assert!(ok, "scripts/cluster rolling: {out}");
    let rolled_at = t0.elapsed();
    let (rush, attempts) = rush.finish().await;
    let sale_ended_at = t0.elapsed();
    let outcomes = by_outcome(&attempts);
    for (outcome, n) in &outcomes {
        assert!(
            !outcome.starts_with('5'),
            "{n} attempts answered {outcome}: {outcomes:?}"
        );
    }

    // Every 202 is one order: none failed, none lost, none twice.
    let rush_orders = assert_orders_once_quiet(&c, sale, &rush).await;
    assert!(
        rush.uncertain.is_empty(),
        "a restart cost an uncertain answer: {rush:?}"
    );
    let late = sell_what_is_left(&c, sale, VIPS[0]).await;
    let (orders, _) = assert_sold_exactly(&c, sale, ROLLING_STOCK).await;
    println!(
        "rolling restart: both gateways upgraded in place and both workers and apis restarted \
         from 2.0 to {:.1} s of a {:.1} s sale; attempts by answer {outcomes:?}; {} 202s = {rush_orders} orders; \
         {late} late buyers; orders {orders} = stock {ROLLING_STOCK}; audit clean; \
         errors (retried by the buyer): {:?}",
        rolled_at.as_secs_f64(),
        sale_ended_at.as_secs_f64(),
        rush.admitted.len(),
        attempts
            .iter()
            .filter_map(|a| a.outcome.as_ref().err())
            .collect::<Vec<_>>(),
    );
}

/// Units and buyers of the app host cut test.
const CUT_STOCK: u32 = 300;
const CUT_BUYERS: u64 = 700;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cutting_an_app_host_off_redelivers_its_unacked_orders_and_it_rejoins_by_itself() {
    if !enabled("app host cut") {
        return;
    }
    let c = Cluster::ready().await;
    let sale = c.create_sale(CUT_STOCK).await;
    let first_rush = buyers(&c, sale, 980_000_001, CUT_BUYERS).await;
    let rush = Running::start(&c, sale, first_rush, &VIPS);
    let t0 = rush.t0;

    // app-1's worker freezes mid-sale, so the deliveries the broker hands
    // it pile up unacknowledged (app-2 keeps writing its share)...
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal("worker-app-1", "STOP");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let admitted_so_far = rush
        .attempts()
        .iter()
        .filter(|a| a.outcome == Ok(202))
        .count();
    let written = order_users(&c, sale).await.len();
    let held = admitted_so_far.saturating_sub(written);
    assert!(
        held > 0,
        "app-1 holds no delivery ({admitted_so_far} 202s, {written} orders)"
    );
    // ...then its host drops off the network, and the worker runs on, cut off.
    let cut_at = t0.elapsed();
    set_link("app-1", false);
    signal("worker-app-1", "CONT");

    // The broker gives app-1's deliveries to app-2 once app-1's connection
    // is declared dead (AMQP heartbeats): one order each.
    let (rush, _) = rush.finish().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let redelivered_at = loop {
        let ordered = order_users(&c, sale).await;
        if rush.admitted.iter().all(|u| ordered.contains(u)) {
            break t0.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "app-1's deliveries were never redelivered"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    rush.assert_orders(order_users(&c, sale).await);

    // The link comes back: app-1's worker reconnects by itself and takes
    // work again: small sales run until it has consumed some of theirs.
    set_link("app-1", true);
    let back_at = t0.elapsed();
    let late = sell_what_is_left(&c, sale, VIPS[0]).await;
    let consumed = || async {
        let metrics = c.http.get("http://10.77.0.21:9191/metrics").send().await;
        match metrics {
            Ok(r) => metric(
                &r.text().await.unwrap_or_default(),
                "seckill_worker_messages_consumed_total",
                &[],
            ),
            Err(_) => 0.0,
        }
    };
    let before = consumed().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut next_user = 985_000_001;
    let rejoined_at = loop {
        let small = c.create_sale(20).await;
        let rush = paced_buyers(
            c.http.clone(),
            VIPS.iter().map(|v| vip_url(v)).collect(),
            small,
            buyers(&c, small, next_user, 20).await,
            Instant::now(),
            Arc::default(),
        )
        .await;
        next_user += 20;
        assert_eq!(rush.admitted.len(), 20);
        let (ok, audit) = c.audit_until_clean(small, Duration::from_secs(60)).await;
        assert!(ok, "audit of sale {small}: {audit}");
        if consumed().await > before {
            break t0.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "app-1's worker never took work again"
        );
    };

    let (ok, audit) = c.audit_until_clean(sale, Duration::from_secs(60)).await;
    assert!(ok, "audit: {audit}");
    println!(
        "app host cut: app-1's worker frozen at 2.0 s holding {held} deliveries, its link cut at {:.1} s; \
         all {} 202s were orders {:.1} s after the cut; link back at {:.1} s, app-1 writing orders \
         again within {:.1} s; {late} late buyers; audits clean",
        cut_at.as_secs_f64(),
        rush.admitted.len(),
        (redelivered_at - cut_at).as_secs_f64(),
        back_at.as_secs_f64(),
        (rejoined_at - back_at).as_secs_f64(),
    );
}

/// Paced buyers running in the background ([`paced_buyers`]) and the log
/// of every attempt they made.
struct Running {
    t0: Instant,
    log: Arc<Mutex<Vec<Attempt>>>,
    task: tokio::task::JoinHandle<Rush>,
}

impl Running {
    /// Starts `buyers` on `sale`, buyer `i` through `vips[i % n]`.
    fn start(c: &Cluster, sale: u64, buyers: Vec<Buyer>, vips: &[&str]) -> Running {
        let t0 = Instant::now();
        let log: Arc<Mutex<Vec<Attempt>>> = Arc::default();
        let bases = vips.iter().map(|v| vip_url(v)).collect();
        let task = tokio::spawn(paced_buyers(
            c.http.clone(),
            bases,
            sale,
            buyers,
            t0,
            log.clone(),
        ));
        Running { t0, log, task }
    }

    /// The attempts so far.
    fn attempts(&self) -> Vec<Attempt> {
        self.log.lock().unwrap().clone()
    }

    /// Waits for every buyer's final answer.
    async fn finish(self) -> (Rush, Vec<Attempt>) {
        let rush = self.task.await.unwrap();
        let attempts = self.log.lock().unwrap().clone();
        (rush, attempts)
    }
}

/// Fail closed: refusals to retry (503), never another server error, and
/// the gateways (alive throughout) answered every request. The attempts
/// by answer, for the figures.
fn assert_failed_closed(attempts: &[Attempt]) -> std::collections::BTreeMap<String, usize> {
    let outcomes = by_outcome(attempts);
    for (outcome, n) in &outcomes {
        assert!(
            !(outcome.starts_with('5') && outcome != "503") && outcome != "error",
            "{n} attempts answered {outcome}: {outcomes:?}"
        );
    }
    outcomes
}

/// The audit clean and exactly `stock` orders kept (unpaid or paid):
/// (orders, the audit report).
async fn assert_sold_exactly(c: &Cluster, sale: u64, stock: u32) -> (u64, Value) {
    let (ok, audit) = c.audit_until_clean(sale, Duration::from_secs(60)).await;
    assert!(ok, "audit: {audit}");
    let orders =
        audit["orders_unpaid"].as_u64().unwrap_or(0) + audit["orders_paid"].as_u64().unwrap_or(0);
    assert_eq!(orders, u64::from(stock), "exactly the stock sold: {audit}");
    (orders, audit)
}

/// Once nothing is in flight, [`Rush::assert_orders`] against MySQL; how
/// many orders the sale has.
async fn assert_orders_once_quiet(c: &Cluster, sale: u64, rush: &Rush) -> usize {
    let quiet = c.audit_when_quiet(sale, Duration::from_secs(60)).await;
    assert_eq!(quiet["quiet"], true, "the queue never drained: {quiet}");
    let ordered = order_users(c, sale).await;
    let count = ordered.len();
    rush.assert_orders(ordered);
    count
}

/// The buyers of `sale`'s orders in MySQL, one entry per order.
async fn order_users(c: &Cluster, sale: u64) -> Vec<u64> {
    let db = sqlx::MySqlPool::connect(&c.config.database.url)
        .await
        .expect("the cluster's MariaDB");
    let users: Vec<u64> = sqlx::query_scalar("SELECT user_id FROM orders WHERE sale_id = ?")
        .bind(sale)
        .fetch_all(&db)
        .await
        .unwrap();
    db.close().await;
    users
}

/// The `scripts/cluster` process name of the Redis node at `ip:port`.
fn redis_process(addr: &str) -> String {
    let (ip, port) = addr.rsplit_once(':').expect("ip:port");
    let host = match ip {
        "10.77.0.31" => "redis-1",
        "10.77.0.32" => "redis-2",
        "10.77.0.33" => "redis-3",
        other => panic!("{other} is not a Redis host of the topology"),
    };
    format!("redis-{host}-{port}")
}

/// The slot test needs no cluster: `CLUSTER NODES` parsing.
#[test]
fn finds_the_master_of_a_slot() {
    let nodes = "a 10.0.0.1:6379@16379 myself,master - 0 0 1 connected 0-5460\n\
                 b 10.0.0.2:6379@16379 master - 0 0 2 connected 5461-10922 16000\n\
                 c 10.0.0.3:6380@16380 slave b 0 0 2 connected\n";
    assert_eq!(master_of_slot(nodes, 0).as_deref(), Some("10.0.0.1:6379"));
    assert_eq!(
        master_of_slot(nodes, 6000).as_deref(),
        Some("10.0.0.2:6379")
    );
    assert_eq!(
        master_of_slot(nodes, 16000).as_deref(),
        Some("10.0.0.2:6379")
    );
    assert_eq!(master_of_slot(nodes, 12000), None);
}

/// Two fresh sales whose slots live on different Redis masters.
async fn two_sales_on_two_masters(c: &Cluster) -> (u64, u64) {
    let a = c.create_sale(HERD_STOCK).await;
    let master_a = c.master_of(a).await.expect("a live master");
    for _ in 0..20 {
        let b = c.create_sale(HERD_STOCK).await;
        if c.master_of(b).await.is_some_and(|m| m != master_a) {
            return (a, b);
        }
    }
    panic!("20 sales in a row on the master of sale {a}: is the cluster balanced?");
}

/// `seckillctl demo` for `sale`: its buyers spread over both VIPs.
async fn demo(c: &Cluster, sale: u64, first_user: u64) -> Value {
    let (sale, first, buyers, greedy) = (
        sale.to_string(),
        first_user.to_string(),
        HERD_BUYERS.to_string(),
        HERD_GREEDY.to_string(),
    );
    let (gw1, gw2) = (vip_url(VIPS[0]), vip_url(VIPS[1]));
    let args = [
        "demo",
        "--sale",
        &sale,
        "--buyers",
        &buyers,
        "--first-user",
        &first,
        "--greedy",
        &greedy,
        "--gateway",
        &gw1,
        "--gateway",
        &gw2,
        "--concurrency",
        "100",
        "--timeout",
        "120s",
        "--json",
        "--no-progress",
    ];
    let (ok, report) = c.ctl(&args).await;
    assert!(ok, "demo of sale {sale}: {report}");
    report
}

/// What `gateway_sale_event_delay_seconds{kind}` gained between two scrapes.
#[derive(Debug)]
struct NoticeDelays {
    count: f64,
    within_100ms: f64,
    /// The smallest bucket bound (seconds) that holds every notice.
    slowest_within: f64,
}

impl NoticeDelays {
    const BOUNDS: [f64; 12] = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];

    fn between(before: &str, after: &str, kind: &str) -> NoticeDelays {
        let name = "gateway_sale_event_delay_seconds";
        let kind = format!("kind=\"{kind}\"");
        let diff = |metric_name: &str, labels: &[&str]| {
            metric(after, metric_name, labels) - metric(before, metric_name, labels)
        };
        let bucket = format!("{name}_bucket");
        let within = |le: f64| diff(&bucket, &[&kind, &format!("le=\"{le}\"")]);
        let count = diff(&format!("{name}_count"), &[&kind]);
        NoticeDelays {
            count,
            within_100ms: within(0.1),
            slowest_within: Self::BOUNDS
                .into_iter()
                .find(|le| within(*le) >= count)
                .unwrap_or(f64::INFINITY),
        }
    }
}

impl std::fmt::Display for NoticeDelays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} notices, all within {} ms",
            self.count,
            self.slowest_within * 1000.0
        )
    }
}

/// One buyer request: when it started (from the first buyer on) and what
/// came back.
#[derive(Debug, Clone)]
struct Attempt {
    at: Duration,
    outcome: Result<u16, String>,
}

impl Attempt {
    /// No answer, or a server error: what the failover may cost.
    fn failed(&self) -> bool {
        !matches!(self.outcome, Ok(s) if s < 500)
    }
}

/// One paced buyer: user id, token and hidden path.
#[derive(Clone)]
struct Buyer {
    user: u64,
    token: String,
    path: String,
}

/// `count` buyers from `first_user` on, with tokens and hidden paths.
async fn buyers(c: &Cluster, sale: u64, first_user: u64, count: u64) -> Vec<Buyer> {
    let users: Vec<u64> = (first_user..first_user + count).collect();
    let tokens = c.tokens(first_user, count).await;
    let paths = c.issue_paths(sale, &users).await;
    users
        .iter()
        .zip(tokens)
        .map(|(u, token)| Buyer {
            user: *u,
            token,
            path: paths[u].clone(),
        })
        .collect()
}

/// How a rush ended for its buyers.
#[derive(Debug, Default)]
struct Rush {
    /// Users answered 202 (sorted).
    admitted: Vec<u64>,
    /// Users whose last answer said their order may have been placed after
    /// all (a publish that could not be confirmed: `not_held`,
    /// `release_failed`), and who got no 202 (sorted).
    uncertain: Vec<u64>,
}

impl Rush {
    /// SPEC: every 202 is one order; an order without a 202 was announced
    /// to its buyer as possibly placed. `ordered`: the sale's order users.
    fn assert_orders(&self, mut ordered: Vec<u64>) {
        ordered.sort_unstable();
        let total = ordered.len();
        ordered.dedup();
        assert_eq!(ordered.len(), total, "a buyer ordered twice");
        for user in &self.admitted {
            assert!(
                ordered.binary_search(user).is_ok(),
                "202 for {user} but no order"
            );
        }
        for user in &ordered {
            assert!(
                self.admitted.binary_search(user).is_ok()
                    || self.uncertain.binary_search(user).is_ok(),
                "an order for {user}, who was never told it may exist"
            );
        }
    }
}

/// Whether a refusal's detail is one of the documented answers saying the
/// order may still be placed.
fn may_have_been_placed(detail: &str) -> bool {
    ["not_held", "release_failed"].iter().any(|outcome| {
        let documented = answer_for(outcome).expect("a documented answer").detail;
        let fixed = documented.split('{').next().unwrap_or(documented);
        detail.starts_with(fixed)
    })
}

/// Buyers starting at `FAILOVER_RATE_PER_SEC`, buyer `i` through
/// `bases[i % n]`; each retries (after 200 ms) until a final answer: 202,
/// 409, 410 or 403. Every attempt goes to `log`.
async fn paced_buyers(
    http: reqwest::Client,
    bases: Vec<String>,
    sale: u64,
    buyers: Vec<Buyer>,
    t0: Instant,
    log: Arc<Mutex<Vec<Attempt>>>,
) -> Rush {
    let gap = Duration::from_micros(1_000_000 / FAILOVER_RATE_PER_SEC);
    let mut tasks = Vec::new();
    for (i, buyer) in buyers.into_iter().enumerate() {
        tokio::time::sleep_until((t0 + gap * i as u32).into()).await;
        let (http, log) = (http.clone(), log.clone());
        let base = &bases[i % bases.len()];
        let url = format!("{base}/api/v1/seckill/{}/{sale}", buyer.path);
        tasks.push(tokio::spawn(async move {
            let mut uncertain = false;
            for _ in 0..100 {
                let at = t0.elapsed();
                let sent = http.post(&url).bearer_auth(&buyer.token).send().await;
                let outcome = match sent {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body: serde_json::Value = r.json().await.unwrap_or_default();
                        let detail = body["detail"].as_str().unwrap_or_default();
                        uncertain |= may_have_been_placed(detail);
                        Ok(status)
                    }
                    Err(e) => Err(e.to_string()),
                };
                log.lock().unwrap().push(Attempt {
                    at,
                    outcome: outcome.clone(),
                });
                match outcome {
                    Ok(202) => return (buyer.user, Some(true)),
                    Ok(403 | 409 | 410) => break,
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
            (buyer.user, uncertain.then_some(false))
        }));
    }
    let mut rush = Rush::default();
    for t in tasks {
        match t.await.unwrap() {
            (user, Some(true)) => rush.admitted.push(user),
            (user, Some(false)) => rush.uncertain.push(user),
            (_, None) => {}
        }
    }
    rush.admitted.sort_unstable();
    rush.uncertain.sort_unstable();
    rush
}

/// Attempts by answer (`"503"`, `"error"`), for the figures.
fn by_outcome(attempts: &[Attempt]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for a in attempts {
        let key = match &a.outcome {
            Ok(s) => s.to_string(),
            Err(_) => "error".to_string(),
        };
        *counts.entry(key).or_default() += 1;
    }
    counts
}

/// Users of `sell_what_is_left`, above every paced buyer.
const LATE_USERS: u64 = 990_000_001;

/// Fresh buyers through `vip` until the sale's Redis stock stays at zero
/// with nothing reserved (stranded units are given back by the sweeper
/// after `worker.reservation_timeout_secs`); how many were admitted.
async fn sell_what_is_left(c: &Cluster, sale: u64, vip: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut next_user = LATE_USERS;
    let mut admitted = 0;
    // What the late buyers were answered, for the failure message.
    let mut answers: std::collections::BTreeMap<String, usize> = Default::default();
    loop {
        let (_, audit) = c.ctl(&["audit", "--sale", &sale.to_string()]).await;
        let stock = audit["redis_stock"].as_i64().unwrap_or(-1);
        let reserved = audit["redis_reservations"].as_i64().unwrap_or(-1);
        let queued = audit["queue_depth"].as_i64().unwrap_or(-1);
        if stock == 0 && reserved == 0 && queued == 0 {
            return admitted;
        }
        assert!(
            Instant::now() < deadline,
            "the sale never settled: {audit}; late buyers were answered {answers:?}"
        );
        if stock > 0 {
            let tokens = c.tokens(next_user, 20).await;
            let users: Vec<u64> = (next_user..next_user + 20).collect();
            let paths = c.issue_paths(sale, &users).await;
            for (i, user) in users.iter().enumerate() {
                let url = format!("{}/api/v1/seckill/{}/{sale}", vip_url(vip), paths[user]);
                let answer = match c.http.post(&url).bearer_auth(&tokens[i]).send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body: Value = r.json().await.unwrap_or_default();
                        format!("{status} {}", body["detail"].as_str().unwrap_or_default())
                    }
                    Err(e) => format!("error {e}"),
                };
                if answer.starts_with("202") {
                    admitted += 1;
                }
                *answers.entry(answer).or_default() += 1;
            }
            next_user += 20;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
