//! `pay`: the three payment modes side by side. In each mode (the apis
//! and the wallet restarted with `payment.mode` set), `--pay-orders`
//! buyers (default 2,000) each pay their unpaid order through the gateway,
//! all at once; then the same again while one api is killed (SIGKILL) a
//! moment into the run, timing how long until every payment has ended
//! and `audit --payments` is clean.
//!
//! ```text
//!  per mode, per round:
//!    orders (published, written by the workers) ─▶ idempotency keys ─▶
//!    N concurrent POST /orders/{id}/pay ─▶ (message: wait until paid) ─▶ audits
//!  per mode, once:
//!    the same with `kill -9 api-0` after 10 % of the answers ─▶ restart it ─▶
//!    time until the payments audit is quiet and clean
//! ```
//!
//! Payments/s counts paid orders over the time from the first request to
//! the last order paid (for `message`, to the last settle, not the 202).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use futures::StreamExt;
use seckill_contracts::config::PaymentMode;
use seckill_workers::payments::audit as payments_audit;
use seckill_workers::payments::wallet_client::WalletClient;
use tokio::sync::Barrier;

use crate::scenarios::Row;
use crate::stack::{self, BenchStack};
use crate::wrk::WrkResult;

/// The modes in the order a round runs them (rounds rotate the order).
pub const MODES: [PaymentMode; 3] = [PaymentMode::Tcc, PaymentMode::Xa, PaymentMode::Message];

/// What each buyer is topped up with: enough for every order of the run.
const CREDIT_CENTS: i64 = 10_000_000;

/// Calls made at once while preparing (keys, top-ups).
const PREPARE_CONCURRENCY: usize = 64;

/// What the scenario needs of the suite.
pub struct PayCtx<'a> {
    pub stack: &'a mut BenchStack,
    pub db: sqlx::MySqlPool,
    pub redis: seckill_contracts::redis_client::RedisConn,
    pub keys: seckill_contracts::keys::KeySchema,
    pub tokens: Arc<Vec<String>>,
    pub http: reqwest::Client,
    pub orders: u64,
    pub rounds: usize,
    /// Database connections per pool of the apis and the wallet.
    pub db_connections: u32,
    /// `--profile`: record the whole machine during each mode's first
    /// round, into this folder.
    pub profile_to: Option<std::path::PathBuf>,
}

/// One timed run's figures.
struct PayRun {
    answered: Duration,
    settled: Duration,
    paid: u64,
    latencies_ms: Vec<f64>,
    statuses: std::collections::BTreeMap<u16, u64>,
    errors: u64,
    audit_ok: bool,
    audit_note: String,
    /// What the database server did per paid order: statements clients
    /// sent (round trips: a procedure call counts once), and CPU
    /// time in microseconds (it is what saturates first here).
    db_statements_per_payment: f64,
    /// Statements the server ran per paid order, those inside stored
    /// procedures included (`Queries`): the work behind a procedure
    /// call, and unlike CPU time the same on a busy or an idle machine.
    db_statements_run_per_payment: f64,
    db_cpu_us_per_payment: f64,
    /// CPU per paid order of each of the stack's own processes (and of
    /// the buyers, this process), in microseconds: where the rest of a
    /// payment's cost goes. Left out of the crash run, whose killed api
    /// takes its CPU count with it.
    cpu_us_per_payment: Vec<(&'static str, f64)>,
    /// `--profile`: where the machine's CPU went while the buyers paid.
    profile_notes: Vec<String>,
}

/// The processes [`PayRun::cpu_us_per_payment`] counts: a report label
/// and the stack's name prefix (`None`: the buyers, this process).
const CPU_SHARES: [(&str, Option<&str>); 5] = [
    ("gateway", Some("gateway")),
    ("apis", Some("api-")),
    ("wallet", Some("wallet")),
    ("workers", Some("worker-")),
    ("buyers", None),
];

/// CPU used so far by each of [`CPU_SHARES`].
fn cpu_by_process(stack: &BenchStack) -> Vec<Duration> {
    CPU_SHARES
        .iter()
        .map(|(_, prefix)| match prefix {
            Some(p) => stack.cpu_time(p),
            None => stack::process_cpu_time(std::process::id()),
        })
        .collect()
}

/// What the database server has done so far: statements clients sent,
/// statements it ran (procedures' included), CPU time.
struct DbWork {
    sent: u64,
    run: u64,
    cpu: Duration,
}

async fn db_work(db: &sqlx::MySqlPool) -> anyhow::Result<DbWork> {
    let status = |name: &'static str| async move {
        // SHOW takes no placeholder; `name` is one of the two below.
        let (_, value): (String, String) =
            sqlx::query_as(&format!("SHOW GLOBAL STATUS LIKE '{name}'"))
                .fetch_one(db)
                .await?;
        anyhow::Ok(value.parse::<u64>()?)
    };
    let cpu = stack::pid_named(&["mariadbd", "mysqld"])
        .map(stack::process_cpu_time)
        .unwrap_or_default();
    Ok(DbWork {
        sent: status("Questions").await?,
        run: status("Queries").await?,
        cpu,
    })
}

/// Runs the scenario; one row per mode: medians over the rounds, and the
/// crash run's time to consistency.
pub async fn run(ctx: &mut PayCtx<'_>) -> anyhow::Result<Vec<Row>> {
    top_up(ctx).await?;
    let mut runs: Vec<(PaymentMode, PayRun)> = Vec::new();
    for round in 0..ctx.rounds {
        for k in 0..MODES.len() {
            let mode = MODES[(k + round) % MODES.len()];
            crate::scenarios::progress(&format!("pay: {} round {}", mode.as_str(), round + 1));
            restart_in(ctx, mode).await?;
            let profile = match (&ctx.profile_to, round) {
                (Some(out), 0) => Some((format!("pay-{}", mode.as_str()), out.clone())),
                _ => None,
            };
            let run = pay_once(ctx, mode, None, profile).await?;
            runs.push((mode, run));
        }
    }
    let mut rows: Vec<Row> = MODES
        .iter()
        .map(|mode| {
            let mine: Vec<&PayRun> = runs
                .iter()
                .filter(|(m, _)| m == mode)
                .map(|(_, r)| r)
                .collect();
            row(*mode, &mine, ctx.orders)
        })
        .collect();
    for (mode, row) in MODES.iter().zip(rows.iter_mut()) {
        crate::scenarios::progress(&format!("pay: {} with an api killed", mode.as_str()));
        restart_in(ctx, *mode).await?;
        crash(ctx, *mode, row).await?;
    }
    restart_in(ctx, PaymentMode::Tcc).await?;
    Ok(rows)
}

async fn restart_in(ctx: &mut PayCtx<'_>, mode: PaymentMode) -> anyhow::Result<()> {
    let env = mode_env(ctx, mode);
    ctx.stack.restart_payment_services(&env).await
}

/// The environment the apis and the wallet run with: the mode, and the
/// pool size (every connection is a server thread of MariaDB, which is
/// what saturates first).
fn mode_env(ctx: &PayCtx<'_>, mode: PaymentMode) -> Vec<(String, String)> {
    let prefix = seckill_contracts::config::ENV_PREFIX;
    let pool = ctx.db_connections.to_string();
    vec![
        (format!("{prefix}PAYMENT__MODE"), mode.as_str().to_string()),
        (format!("{prefix}DATABASE__MAX_CONNECTIONS"), pool.clone()),
        (format!("{prefix}WALLET__MAX_CONNECTIONS"), pool),
    ]
}

/// Every buyer's wallet, topped up through the wallet's admin route.
async fn top_up(ctx: &PayCtx<'_>) -> anyhow::Result<()> {
    let wallet = WalletClient::new(&ctx.stack.config);
    let admin = ctx.stack.admin_token.clone();
    let wallet = &wallet;
    let admin = &admin;
    let failed = futures::stream::iter(1..=ctx.orders)
        .map(|user| async move { wallet.credit(admin, user, CREDIT_CENTS).await.is_err() })
        .buffer_unordered(PREPARE_CONCURRENCY)
        .filter(|failed| std::future::ready(*failed))
        .count()
        .await;
    anyhow::ensure!(failed == 0, "{failed} top-ups failed");
    Ok(())
}

/// A sale whose `n` orders (users `1..=n`) are written and unpaid: what
/// each buyer pays. Returns the sale and (user, order id) pairs.
async fn unpaid_orders(ctx: &mut PayCtx<'_>) -> anyhow::Result<(u64, Vec<(u64, String)>)> {
    let n = ctx.orders;
    let now = Utc::now();
    let sale = seckill_workers::sales::create(
        &ctx.db,
        &mut ctx.redis,
        &ctx.keys,
        &seckill_workers::sales::NewSale {
            title: "Bench payments".into(),
            price_cents: 1999,
            sale_price_cents: 999,
            stock: u32::try_from(n)?,
            starts_at: now,
            ends_at: now + chrono::Duration::hours(1),
        },
    )
    .await?
    .id;
    // Redis as after n admissions (the sale audit checks it).
    let _: () = redis::cmd("SET")
        .arg(ctx.keys.sale(sale).stock())
        .arg(0)
        .query_async(&mut ctx.redis)
        .await?;
    let messages: Vec<seckill_contracts::OrderMessage> = (1..=n)
        .map(|u| {
            seckill_contracts::OrderMessage::new(
                format!("pay-{sale}-{u}"),
                sale,
                u,
                Utc::now().timestamp_millis(),
            )
        })
        .collect();
    stack::publish_orders(&ctx.stack.config, &messages).await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let rows: Vec<(u64, String)> =
            sqlx::query_as("SELECT user_id, id FROM orders WHERE sale_id = ? ORDER BY user_id")
                .bind(sale)
                .fetch_all(&ctx.db)
                .await?;
        if rows.len() as u64 >= n {
            return Ok((sale, rows));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the workers never wrote the orders"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One idempotency key per buyer, through the gateway, every buyer at
/// once, as they would fetch it on opening the payment page: each then
/// pays over the connection it fetched its key on (kept alive), and the
/// gateway and the api have met a crowd of this size before the timed
/// run, whichever mode goes first.
async fn keys_for(ctx: &PayCtx<'_>, users: &[u64]) -> anyhow::Result<Vec<String>> {
    let url = ctx.stack.gateway_url("/api/v1/idempotency-key");
    let (http, tokens, url) = (&ctx.http, &ctx.tokens, &url);
    let keys: Vec<anyhow::Result<String>> = futures::stream::iter(users.iter().copied())
        .map(|user| async move {
            let token = tokens
                .get((user - 1) as usize)
                .context("no token for this buyer")?;
            let body: serde_json::Value = http
                .get(url)
                .bearer_auth(token)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            body["key"]
                .as_str()
                .map(str::to_string)
                .context("no key in the answer")
        })
        .buffered(users.len().max(1))
        .collect()
        .await;
    keys.into_iter().collect()
}

/// Pays every order of a fresh sale at once; with `kill`, kills that api
/// after a tenth of the answers and restarts it (the crash run); with
/// `profile` (a name and a folder), records the machine until the
/// payments have settled.
async fn pay_once(
    ctx: &mut PayCtx<'_>,
    mode: PaymentMode,
    kill: Option<&str>,
    profile: Option<(String, std::path::PathBuf)>,
) -> anyhow::Result<PayRun> {
    let (sale, orders) = unpaid_orders(ctx).await?;
    let users: Vec<u64> = orders.iter().map(|(u, _)| *u).collect();
    let keys = keys_for(ctx, &users).await?;
    let barrier = Arc::new(Barrier::new(orders.len() + 1));
    let answered_count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(orders.len());
    for ((user, order), key) in orders.iter().zip(keys) {
        let url = ctx
            .stack
            .gateway_url(&format!("/api/v1/orders/{order}/pay"));
        let token = ctx.tokens[(*user - 1) as usize].clone();
        let (http, barrier, answered_count) =
            (ctx.http.clone(), barrier.clone(), answered_count.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let sent = Instant::now();
            let status = http
                .post(url)
                .bearer_auth(token)
                .header("Idempotency-Key", key)
                .timeout(Duration::from_secs(60))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .ok();
            answered_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (status, sent.elapsed())
        }));
    }
    let db_before = db_work(&ctx.db).await?;
    let cpu_before = cpu_by_process(ctx.stack);
    let profile = match profile {
        Some((name, out)) => {
            let mut labels = ctx.stack.pids();
            labels.push((std::process::id(), "buyers (the bench)".into()));
            Some(crate::profile::Profile::machine(&name, &out, labels)?)
        }
        None => None,
    };
    barrier.wait().await;
    let start = Instant::now();
    let mut killed_at = None;
    let mut open_at_kill = None;
    if let Some(name) = kill {
        let tenth = orders.len() / 10;
        while answered_count.load(std::sync::atomic::Ordering::Relaxed) < tenth {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        ctx.stack.kill_hard(name);
        killed_at = Some(Instant::now());
        open_at_kill = Some(open_transactions(&ctx.db).await?);
        let index: usize = name.trim_start_matches("api-").parse()?;
        let env = mode_env(ctx, mode);
        let health = ctx.stack.spawn_api(index, &env)?;
        stack::wait_ok(&health, Duration::from_secs(60)).await?;
    }
    let mut latencies_ms = Vec::with_capacity(tasks.len());
    let mut statuses = std::collections::BTreeMap::new();
    let mut errors = 0;
    for t in tasks {
        let (status, took) = t.await?;
        latencies_ms.push(took.as_secs_f64() * 1000.0);
        match status {
            Some(code) => *statuses.entry(code).or_insert(0) += 1,
            None => errors += 1,
        }
    }
    let answered = start.elapsed();
    let accepted =
        statuses.get(&200).copied().unwrap_or(0) + statuses.get(&202).copied().unwrap_or(0);
    // Settled: every accepted payment paid (the message mode settles after
    // its 202); the crash run waits for the audit instead.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut paid = 0;
    while kill.is_none() {
        paid = paid_count(&ctx.db, sale).await?;
        if paid >= accepted || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let settled = start.elapsed();
    let profile_notes = match profile {
        Some(p) => {
            p.stop()?;
            p.finish()?
        }
        None => Vec::new(),
    };
    let db_after = db_work(&ctx.db).await?;
    let per_paid = |x: f64| if paid == 0 { 0.0 } else { x / paid as f64 };
    let db_statements_per_payment = per_paid(db_after.sent.saturating_sub(db_before.sent) as f64);
    let db_statements_run_per_payment = per_paid(db_after.run.saturating_sub(db_before.run) as f64);
    let db_cpu_us_per_payment =
        per_paid(db_after.cpu.saturating_sub(db_before.cpu).as_secs_f64() * 1e6);
    let cpu_us_per_payment = if kill.is_none() {
        let after = cpu_by_process(ctx.stack);
        CPU_SHARES
            .iter()
            .zip(after.iter().zip(&cpu_before))
            .map(|((label, _), (a, b))| {
                (*label, per_paid(a.saturating_sub(*b).as_secs_f64() * 1e6))
            })
            .collect()
    } else {
        Vec::new()
    };
    let wallet = WalletClient::new(&ctx.stack.config);
    let report = payments_audit::run(&ctx.db, &wallet, Duration::from_secs(120)).await?;
    let consistent_after = killed_at.map(|k| k.elapsed());
    if kill.is_some() {
        paid = paid_count(&ctx.db, sale).await?;
    }
    let sale_audit = seckill_workers::audit::run(
        &ctx.stack.config,
        &ctx.db,
        &mut ctx.redis,
        sale,
        Duration::from_secs(60),
    )
    .await?;
    let mut audit_note = format!(
        "payments audit {} (balances {} + paid {} = top-ups {}), sale audit {}",
        if report.ok { "clean" } else { "FAILED" },
        report.balances_cents,
        report.paid_orders_cents,
        report.credited_cents,
        if sale_audit.ok { "clean" } else { "FAILED" },
    );
    if !report.ok {
        audit_note.push_str(&format!(": {:?}", report.violations));
    }
    if let Some(t) = consistent_after {
        let by_recovery: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pay_transactions t JOIN orders o ON o.id = t.order_id \
             WHERE o.sale_id = ? AND t.reason = 'timeout'",
        )
        .bind(sale)
        .fetch_one(&ctx.db)
        .await?;
        audit_note.push_str(&format!(
            "; {} payment transactions open (both apis) right after the kill, {by_recovery} \
             aborted by recovery; consistent {:.2} s after the kill",
            open_at_kill.unwrap_or(0),
            t.as_secs_f64()
        ));
    }
    Ok(PayRun {
        answered,
        settled: consistent_after.unwrap_or(settled),
        paid,
        latencies_ms,
        statuses,
        errors,
        audit_ok: report.ok && sale_audit.ok,
        audit_note,
        db_statements_per_payment,
        db_statements_run_per_payment,
        db_cpu_us_per_payment,
        cpu_us_per_payment,
        profile_notes,
    })
}

/// Payment transactions not ended yet (any api's).
async fn open_transactions(db: &sqlx::MySqlPool) -> anyhow::Result<i64> {
    Ok(seckill_workers::payments::log::open_count(db).await?)
}

async fn paid_count(db: &sqlx::MySqlPool, sale: u64) -> anyhow::Result<u64> {
    let n: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM orders WHERE sale_id = ? AND status = 'paid'")
            .bind(sale)
            .fetch_one(db)
            .await?;
    Ok(n as u64)
}

/// The crash run of `mode` (one api killed mid-run), added to its row.
async fn crash(ctx: &mut PayCtx<'_>, mode: PaymentMode, row: &mut Row) -> anyhow::Result<()> {
    let run = pay_once(ctx, mode, Some("api-0"), None).await?;
    row.consistency_s = Some(run.settled.as_secs_f64());
    row.audit_ok = Some(row.audit_ok.unwrap_or(true) && run.audit_ok);
    row.notes.push(format!(
        "`kill -9` of api-0 after a tenth of the answers, restarted at once: every payment ended and the audits clean {:.2} s after the kill (recovery takes over transactions idle for payment.transaction_timeout_ms); answers {:?}, {} errors; {}",
        run.settled.as_secs_f64(),
        run.statuses,
        run.errors,
        run.audit_note
    ));
    Ok(())
}

/// A mode's row: medians over its rounds.
fn row(mode: PaymentMode, runs: &[&PayRun], orders: u64) -> Row {
    let mut row = Row::new(&format!("pay {}", mode.as_str()));
    let rates: Vec<f64> = runs
        .iter()
        .map(|r| r.paid as f64 / r.settled.as_secs_f64())
        .collect();
    let pct = |p: f64| {
        median(
            runs.iter()
                .map(|r| percentile(&r.latencies_ms, p))
                .collect(),
        )
    };
    let rate = median(rates.clone());
    row.wrk = Some(WrkResult {
        requests: orders,
        seconds: median(runs.iter().map(|r| r.settled.as_secs_f64()).collect()),
        rps: rate,
        p50_ms: pct(50.0),
        p90_ms: pct(90.0),
        p99_ms: pct(99.0),
        p999_ms: pct(99.9),
        socket_errors: runs.iter().map(|r| r.errors).sum(),
        command: format!(
            "{orders} buyers paying their orders at once through the gateway, payment.mode = {}",
            mode.as_str()
        ),
        cdf: Vec::new(),
    });
    row.rate = rate;
    row.db_per_payment = Some((
        median(runs.iter().map(|r| r.db_statements_per_payment).collect()),
        median(runs.iter().map(|r| r.db_cpu_us_per_payment).collect()),
    ));
    row.audit_ok = Some(runs.iter().all(|r| r.audit_ok));
    row.committed = runs.first().map(|r| r.paid);
    for (i, r) in runs.iter().enumerate() {
        row.notes.push(format!(
            "round {}: {} paid, {:.0} payments/s (all answered in {:.2} s, settled in {:.2} s), answers {:?}; MariaDB per payment: {:.1} statements sent ({:.1} run, procedures' included), {:.0} µs CPU; {}",
            i + 1,
            r.paid,
            rates[i],
            r.answered.as_secs_f64(),
            r.settled.as_secs_f64(),
            r.statuses,
            r.db_statements_per_payment,
            r.db_statements_run_per_payment,
            r.db_cpu_us_per_payment,
            r.audit_note
        ));
        if !r.cpu_us_per_payment.is_empty() {
            let shares: Vec<String> = r
                .cpu_us_per_payment
                .iter()
                .map(|(label, us)| format!("{label} {us:.0} µs"))
                .collect();
            row.notes.push(format!(
                "round {}: CPU per payment of the other processes (from /proc): {}",
                i + 1,
                shares.join(", ")
            ));
        }
        row.notes.extend(r.profile_notes.iter().cloned());
    }
    row
}

fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let at = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[at.min(v.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_medians_pick_the_ranked_value() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 51.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    }
}
