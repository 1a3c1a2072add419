//! `seckillctl demo`: the platform's main job, end to end, on a running
//! stack. Simulated buyers go through the gateway exactly as a buyer's app
//! would, and the run ends with the audit, so a demo that "worked" also
//! proves the invariants held.
//!
//! ```text
//! sale      the one given, or a fresh one (stock --stock, starting now)
//! prepare   per buyer: token (dev private key) → GET captcha (PNG) → answer
//!           read from Redis (a simulated buyer cannot read the picture)
//!           → POST /sales/{id}/path → hidden path
//! rush      all buyers at once: POST /seckill/{path}/{id}; a 429/503 with
//!           Retry-After is retried like an app would, a few times; the
//!           first --greedy buyers fire several attempts at once, across
//!           the gateways, as a bot would (at most one may be admitted)
//! settle    every 202 polls GET /sales/{id}/result until success or failed
//! pay       the first --pay buyers with an order get their wallet topped up
//!           (the wallet's admin route) and pay through the gateway
//!           (idempotency key, POST /orders/{id}/pay)
//! report    admitted, sold, rejected by reason, time to sell out, orders
//!           committed in MySQL, paid, the audit (invariants 1, 2, 4, and 7
//!           when anyone paid)
//! ```
//!
//! With several gateways (a fleet behind keepalived VIPs, DNS round robin)
//! buyer `i` uses gateway `i mod n` for its whole journey.
//!
//! Buyers' user ids start at `first_user`, far above registered accounts,
//! so the demo never buys as a real user. Progress goes to stderr (a bar,
//! or nothing), the report is returned for the CLI to print.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::stream::{self, StreamExt};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::header::RETRY_AFTER;
use reqwest::StatusCode;
use seckill_contracts::config::Config;
use seckill_contracts::keys::KeySchema;
use seckill_contracts::redis_client::RedisConn;
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::MySqlPool;

use crate::audit::{self, AuditReport};
use crate::keyring;
use crate::payments::audit::PaymentsReport;
use crate::payments::wallet_client::WalletClient;
use crate::sales::{self, NewSale};
use crate::statuses::ResultStatus;
use crate::tokens::TokenSigner;

/// How one demo run behaves (the CLI's flags).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Sale to buy from; `None` creates a fresh one with `stock` units, so
    /// every run starts from a full sale.
    pub sale: Option<u64>,
    /// Units of a freshly created sale.
    pub stock: u32,
    /// Number of simulated buyers.
    pub buyers: u64,
    /// First buyer's user id; buyers are `first_user..first_user + buyers`.
    pub first_user: u64,
    /// Gateway base URLs, e.g. `http://127.0.0.1:8080`; buyers are spread
    /// over them round robin.
    pub gateways: Vec<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Retries of a 429 or 503 answer that carries `Retry-After`.
    pub retries: u32,
    /// How many of the buyers are greedy: they send `greedy_attempts`
    /// attempts at once instead of one.
    pub greedy: u64,
    /// Attempts a greedy buyer sends at once.
    pub greedy_attempts: u32,
    /// Give up waiting for results after this long.
    pub timeout: Duration,
    /// How many buyers with an order pay for it (0: nobody pays, for a
    /// stack without a wallet service).
    pub pay: u64,
    /// Draw progress bars on stderr.
    pub progress: bool,
}

impl DemoOptions {
    /// The defaults of `seckillctl demo` against `config`'s gateway.
    pub fn new(config: &Config) -> DemoOptions {
        DemoOptions {
            sale: None,
            stock: 100,
            buyers: 1_000,
            first_user: 900_000_001,
            gateways: vec![gateway_url(&config.gateway.listen.to_string())],
            concurrency: 200,
            retries: 3,
            greedy: 0,
            greedy_attempts: 5,
            timeout: Duration::from_secs(60),
            pay: 10,
            progress: true,
        }
    }
}

/// `http://` URL for a listen address; a wildcard bind is reached on loopback.
pub fn gateway_url(listen: &str) -> String {
    let addr = listen
        .replace("0.0.0.0:", "127.0.0.1:")
        .replace("[::]:", "[::1]:");
    format!("http://{addr}")
}

/// Why a demo could not run (an unhealthy stack, not a failed audit: that
/// is reported in [`DemoReport::ok`]).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("no sale with id {0}")]
    UnknownSale(u64),
    #[error("sale: {0}")]
    Sale(#[from] sales::SaleError),
    #[error("signing buyer tokens: {0}")]
    Tokens(#[from] crate::tokens::TokenError),
    #[error(transparent)]
    Keys(#[from] crate::keyring::KeyringError),
    #[error("no gateway URL given")]
    NoGateway,
    #[error("gateway at {url}: {source}")]
    Gateway { url: String, source: reqwest::Error },
    #[error("buyer {user}: {step} answered {status}: {body}")]
    Journey {
        user: u64,
        step: &'static str,
        status: u16,
        body: String,
    },
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("MySQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error("audit: {0}")]
    Audit(#[from] audit::AuditError),
    #[error("payments audit: {0}")]
    PaymentsAudit(#[from] crate::payments::audit::PaymentsAuditError),
    #[error("topping a wallet up: {0}")]
    Wallet(#[from] crate::payments::wallet_client::WalletCallError),
    #[error(transparent)]
    Config(#[from] seckill_contracts::config::ConfigError),
}

/// What the demo saw, printed by `seckillctl demo`.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub sale_id: u64,
    pub buyers: u64,
    pub stock_total: u32,
    /// Stock still available when the rush began.
    pub stock_at_start: u32,
    /// Buyers answered `202 queued`.
    pub admitted: u64,
    /// Greedy buyers (several attempts at once, across the gateways).
    pub greedy: u64,
    /// Buyers answered `202` more than once: must be 0 (one per buyer).
    pub admitted_twice: u64,
    /// Results that came back `success` (an order exists).
    pub sold: u64,
    /// Results that came back `failed` (the worker refused the order).
    pub failed: u64,
    /// Admitted buyers whose result was still pending at the timeout.
    pub unsettled: u64,
    /// Final refusals by `"<status> <detail>"`, after retries.
    pub rejected: BTreeMap<String, u64>,
    /// Retried 429/503 answers.
    pub retried: u64,
    /// From the first seckill request to the last unit admitted, when the
    /// sale sold out.
    pub sold_out_after_ms: Option<u64>,
    /// From the first seckill request to the last result known.
    pub settled_after_ms: u64,
    /// Preparation (captcha and path for every buyer).
    pub prepare_ms: u64,
    /// Orders of this sale in MySQL after the run.
    pub orders_committed: i64,
    /// Buyers who paid (200, or 202 then settled), of those asked to (`pay`).
    pub paid: u64,
    /// Pay answers other than 200, by `"<status> <detail>"`.
    pub pay_refused: BTreeMap<String, u64>,
    pub audit: AuditReport,
    /// Invariant 7 across the order and wallet databases, when anyone paid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payments_audit: Option<PaymentsReport>,
    /// Audit clean, every 202 settled as an order, nothing oversold, no
    /// buyer admitted twice.
    pub ok: bool,
}

/// One buyer after preparation.
struct Buyer {
    user: u64,
    token: String,
    path: String,
    /// Index of the gateway this buyer's journey goes through.
    gateway: usize,
}

/// Counters shared by all buyer tasks.
#[derive(Default)]
struct Tally {
    admitted: AtomicU64,
    admitted_twice: AtomicU64,
    retried: AtomicU64,
    rejected: Mutex<BTreeMap<String, u64>>,
    last_admit: Mutex<Option<Instant>>,
}

/// One demo run's shared parts: the options, the gateway client and the
/// progress bars.
struct Run<'a> {
    opts: &'a DemoOptions,
    client: Client,
    keys: KeySchema,
    bars: MultiProgress,
}

/// Runs the demo against the stack `config` describes.
pub async fn run(
    config: &Config,
    db: &MySqlPool,
    redis: &mut RedisConn,
    opts: &DemoOptions,
) -> Result<DemoReport, DemoError> {
    let keys = KeySchema::new(config.redis.key_prefix.clone());
    if opts.gateways.is_empty() {
        return Err(DemoError::NoGateway);
    }
    let sale = open_sale(db, redis, &keys, opts).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.concurrency)
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|source| DemoError::Gateway {
            url: opts.gateways.join(", "),
            source,
        })?;
    let run = Run {
        opts,
        client: Client {
            http,
            bases: opts
                .gateways
                .iter()
                .map(|g| g.trim_end_matches('/').to_string())
                .collect(),
            sale_id: sale.id,
        },
        keys,
        bars: MultiProgress::with_draw_target(if opts.progress {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        }),
    };
    let started = Instant::now();
    let signer = keyring::current_signer(&config.jwt, seckill_contracts::clock::unix_secs())?;
    let buyers = run.prepare(&signer, redis).await?;
    let prepare_ms = millis(started.elapsed());
    let stock_at_start = sales::redis_stock(redis, &run.keys, sale.id)
        .await?
        .unwrap_or_default()
        .max(0) as u32;
    let tally = Tally::default();
    let rush_started = Instant::now();
    let admitted = run.rush(&buyers, &tally).await;
    let results = run.settle(&admitted).await;
    let payments = run.pay(config, &admitted, &results).await?;
    if !run.bars.is_hidden() {
        // The bars end mid-line; the summary starts on its own.
        eprintln!();
    }
    let outcome = Outcome {
        stock_total: sale.stock_total,
        stock_at_start,
        prepare_ms,
        settled_after_ms: millis(rush_started.elapsed()),
        rush_started,
        results: results
            .iter()
            .map(|r| r.as_ref().map(|(s, _)| *s))
            .collect(),
        payments,
    };
    report(config, db, redis, &run, &tally, outcome).await
}

/// The sale given, or a fresh one of `opts.stock` units starting now.
async fn open_sale(
    db: &MySqlPool,
    redis: &mut RedisConn,
    keys: &KeySchema,
    opts: &DemoOptions,
) -> Result<sales::Sale, DemoError> {
    if let Some(id) = opts.sale {
        return sales::get(db, id).await?.ok_or(DemoError::UnknownSale(id));
    }
    let now = Utc::now();
    let new = NewSale {
        title: "Demo phone".into(),
        price_cents: 99_900,
        sale_price_cents: 19_900,
        stock: opts.stock,
        starts_at: now,
        ends_at: now + chrono::Duration::hours(1),
    };
    Ok(sales::create(db, redis, keys, &new).await?)
}

impl Run<'_> {
    /// Every buyer's token, captcha and hidden path.
    async fn prepare(
        &self,
        signer: &TokenSigner,
        redis: &RedisConn,
    ) -> Result<Vec<Buyer>, DemoError> {
        let first = self.opts.first_user;
        let users = first..first.saturating_add(self.opts.buyers);
        let bar = progress_bar(&self.bars, users.end - users.start, "captcha + path");
        let mut buyers = Vec::with_capacity(usize::try_from(self.opts.buyers).unwrap_or(0));
        let mut prepared = stream::iter(users)
            .map(|user| {
                let mut redis = redis.clone();
                let gateway = ((user - first) % self.client.bases.len() as u64) as usize;
                async move {
                    let token = signer.issue(user, &format!("demo-buyer-{user}"))?;
                    let path = self
                        .client
                        .prepare(gateway, &token, user, &self.keys, &mut redis)
                        .await?;
                    Ok::<_, DemoError>(Buyer {
                        user,
                        token,
                        path,
                        gateway,
                    })
                }
            })
            .buffer_unordered(self.opts.concurrency.max(1));
        while let Some(buyer) = prepared.next().await {
            buyers.push(buyer?);
            bar.inc(1);
        }
        bar.finish();
        Ok(buyers)
    }

    /// All buyers at once; returns the admitted ones.
    async fn rush<'b>(&self, buyers: &'b [Buyer], tally: &Tally) -> Vec<&'b Buyer> {
        let bar = progress_bar(&self.bars, buyers.len() as u64, "rush");
        let admitted = stream::iter(buyers.iter())
            .map(|buyer| {
                let bar = &bar;
                async move {
                    let won = self.attempts(buyer, tally).await;
                    bar.inc(1);
                    bar.set_message(format!(
                        "admitted {}",
                        tally.admitted.load(Ordering::Relaxed)
                    ));
                    won.then_some(buyer)
                }
            })
            .buffer_unordered(self.opts.concurrency.max(1))
            .filter_map(|b| async move { b })
            .collect()
            .await;
        bar.finish();
        admitted
    }

    /// One buyer's rush: one attempt, or for a greedy buyer several at
    /// once, each through the next gateway. True when admitted.
    async fn attempts(&self, buyer: &Buyer, tally: &Tally) -> bool {
        let greedy = buyer.user - self.opts.first_user < self.opts.greedy;
        let n = if greedy {
            self.opts.greedy_attempts.max(1)
        } else {
            1
        };
        let gateways = self.client.bases.len();
        let wins = futures::future::join_all((0..n as usize).map(|i| {
            let gateway = (buyer.gateway + i) % gateways;
            self.client.rush(buyer, gateway, self.opts.retries, tally)
        }))
        .await
        .into_iter()
        .filter(|won| *won)
        .count();
        if wins > 0 {
            tally.admitted.fetch_add(1, Ordering::Relaxed);
        }
        if wins > 1 {
            tally.admitted_twice.fetch_add(1, Ordering::Relaxed);
        }
        wins > 0
    }

    /// Every admitted buyer's final result and order id (`None`: none
    /// before the timeout).
    async fn settle(&self, admitted: &[&Buyer]) -> Vec<Option<(ResultStatus, Option<String>)>> {
        let bar = progress_bar(&self.bars, admitted.len() as u64, "results");
        let deadline = Instant::now() + self.opts.timeout;
        let results = stream::iter(admitted.iter())
            .map(|buyer| {
                let bar = &bar;
                async move {
                    let status = self.client.settle(buyer, deadline).await;
                    bar.inc(1);
                    status
                }
            })
            // In the order of `admitted`: the pay phase pairs them up.
            .buffered(self.opts.concurrency.max(1))
            .collect()
            .await;
        bar.finish();
        results
    }
}

impl Run<'_> {
    /// The pay phase: the first `opts.pay` buyers with an order are topped
    /// up with the order's amount and pay it through the gateway.
    async fn pay(
        &self,
        config: &Config,
        admitted: &[&Buyer],
        results: &[Option<(ResultStatus, Option<String>)>],
    ) -> Result<Payments, DemoError> {
        let mut done = Payments::default();
        if self.opts.pay == 0 {
            return Ok(done);
        }
        let token = seckill_contracts::config::read_secret(
            "api.admin_token",
            config.api.admin_token.as_deref(),
            config.api.admin_token_path.as_deref(),
        )?;
        let wallet = WalletClient::new(config);
        let payers: Vec<(&Buyer, &str)> = admitted
            .iter()
            .zip(results)
            .filter_map(|(b, r)| match r {
                Some((ResultStatus::Success, Some(order))) => Some((*b, order.as_str())),
                _ => None,
            })
            .take(usize::try_from(self.opts.pay).unwrap_or(usize::MAX))
            .collect();
        let bar = progress_bar(&self.bars, payers.len() as u64, "payments");
        for (buyer, order) in payers {
            wallet.credit(&token, buyer.user, DEMO_TOP_UP_CENTS).await?;
            match self.client.pay(buyer, order).await {
                Ok(()) => done.paid += 1,
                Err(reason) => *done.refused.entry(reason).or_default() += 1,
            }
            bar.inc(1);
        }
        bar.finish();
        Ok(done)
    }
}

/// What the demo tops a paying buyer up with (more than any demo price).
const DEMO_TOP_UP_CENTS: i64 = 100_000;

/// What the phases measured, for the report.
struct Outcome {
    stock_total: u32,
    stock_at_start: u32,
    prepare_ms: u64,
    settled_after_ms: u64,
    rush_started: Instant,
    results: Vec<Option<ResultStatus>>,
    payments: Payments,
}

/// What the pay phase did.
#[derive(Default)]
struct Payments {
    paid: u64,
    refused: BTreeMap<String, u64>,
}

/// The audit and the counts after the run.
async fn report(
    config: &Config,
    db: &MySqlPool,
    redis: &mut RedisConn,
    run: &Run<'_>,
    tally: &Tally,
    outcome: Outcome,
) -> Result<DemoReport, DemoError> {
    let sale_id = run.client.sale_id;
    let count = |s| outcome.results.iter().filter(|r| **r == Some(s)).count() as u64;
    let (sold, failed) = (count(ResultStatus::Success), count(ResultStatus::Failed));
    let redis_stock = sales::redis_stock(redis, &run.keys, sale_id).await?;
    let sold_out_after_ms = match (redis_stock, *lock(&tally.last_admit)) {
        (Some(0), Some(at)) => Some(millis(at.saturating_duration_since(outcome.rush_started))),
        _ => None,
    };
    let audit = audit::run(config, db, redis, sale_id, Duration::from_secs(30)).await?;
    let payments_audit = if outcome.payments.paid > 0 {
        let wallet = WalletClient::new(config);
        Some(crate::payments::audit::run(db, &wallet, Duration::from_secs(30)).await?)
    } else {
        None
    };
    let orders_committed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders WHERE sale_id = ?")
        .bind(sale_id)
        .fetch_one(db)
        .await?;
    let admitted = tally.admitted.load(Ordering::Relaxed);
    let admitted_twice = tally.admitted_twice.load(Ordering::Relaxed);
    let unsettled = admitted.saturating_sub(sold + failed);
    let ok = audit.ok
        && unsettled == 0
        && admitted_twice == 0
        && admitted <= u64::from(outcome.stock_at_start)
        && outcome.payments.refused.is_empty()
        && payments_audit.as_ref().is_none_or(|p| p.ok);
    Ok(DemoReport {
        sale_id,
        buyers: run.opts.buyers,
        stock_total: outcome.stock_total,
        stock_at_start: outcome.stock_at_start,
        admitted,
        greedy: run.opts.greedy.min(run.opts.buyers),
        admitted_twice,
        sold,
        failed,
        unsettled,
        rejected: lock(&tally.rejected).clone(),
        retried: tally.retried.load(Ordering::Relaxed),
        sold_out_after_ms,
        settled_after_ms: outcome.settled_after_ms,
        prepare_ms: outcome.prepare_ms,
        orders_committed,
        paid: outcome.payments.paid,
        pay_refused: outcome.payments.refused,
        audit,
        payments_audit,
        ok,
    })
}

/// The human summary `seckillctl demo` prints without `--json`.
pub fn summary(r: &DemoReport) -> String {
    let mut out = format!(
        "sale {}: {} buyers for {} units ({} left at the start)\n",
        r.sale_id, r.buyers, r.stock_total, r.stock_at_start
    );
    out += &format!(
        "  admitted {} (202 queued), sold {}, failed {}, unsettled {}\n",
        r.admitted, r.sold, r.failed, r.unsettled
    );
    if r.greedy > 0 {
        out += &format!(
            "  greedy buyers {} (several attempts at once), admitted twice {}\n",
            r.greedy, r.admitted_twice
        );
    }
    for (reason, n) in &r.rejected {
        out += &format!("  rejected {n:>5}  {reason}\n");
    }
    if r.retried > 0 {
        out += &format!("  retried {} answers with Retry-After\n", r.retried);
    }
    match r.sold_out_after_ms {
        Some(ms) => out += &format!("  sold out {ms} ms after the first request\n"),
        None => out += "  not sold out\n",
    }
    out += &format!(
        "  every result known after {} ms; preparation (captcha + path) took {} ms\n",
        r.settled_after_ms, r.prepare_ms
    );
    out += &format!("  orders committed in MySQL: {}\n", r.orders_committed);
    out += &format!("  paid {} orders through the gateway\n", r.paid);
    for (reason, n) in &r.pay_refused {
        out += &format!("  pay refused {n:>3}  {reason}\n");
    }
    match &r.payments_audit {
        Some(p) if p.ok => {
            out += "  payments audit: ok (money conserved, one debit per paid order)\n"
        }
        Some(p) => out += &format!("  payments audit: FAILED: {}\n", p.violations.join("; ")),
        None => {}
    }
    if r.audit.ok {
        out += "  audit: ok (no oversell, one order per buyer, Redis + orders = stock)\n";
    } else {
        out += &format!("  audit: FAILED: {}\n", r.audit.violations.join("; "));
    }
    out
}

/// HTTP calls of one buyer journey, all through the gateway.
struct Client {
    http: reqwest::Client,
    bases: Vec<String>,
    sale_id: u64,
}

impl Client {
    fn url(&self, gateway: usize, path: &str) -> String {
        format!("{}/api/v1{path}", self.bases[gateway])
    }

    fn gateway_error(&self, gateway: usize, source: reqwest::Error) -> DemoError {
        DemoError::Gateway {
            url: self.bases[gateway].clone(),
            source,
        }
    }

    /// Captcha, its answer, and the hidden path it unlocks.
    async fn prepare(
        &self,
        gateway: usize,
        token: &str,
        user: u64,
        keys: &KeySchema,
        redis: &mut RedisConn,
    ) -> Result<String, DemoError> {
        let resp = self
            .http
            .get(self.url(gateway, &format!("/sales/{}/captcha", self.sale_id)))
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| self.gateway_error(gateway, e))?;
        expect_ok(user, "GET captcha", resp).await?;
        let answer: Option<String> = redis::cmd("GET")
            .arg(keys.sale(self.sale_id).captcha(user))
            .query_async(redis)
            .await?;
        let answer = answer.unwrap_or_default();
        let resp = self
            .http
            .post(self.url(gateway, &format!("/sales/{}/path", self.sale_id)))
            .bearer_auth(token)
            .json(&json!({ "captcha_answer": answer }))
            .send()
            .await
            .map_err(|e| self.gateway_error(gateway, e))?;
        let body = expect_ok(user, "POST path", resp).await?;
        Ok(body["path"].as_str().unwrap_or_default().to_string())
    }

    /// One attempt of a buyer through `gateway`; true when admitted (202).
    async fn rush(&self, buyer: &Buyer, gateway: usize, retries: u32, tally: &Tally) -> bool {
        let url = self.url(
            gateway,
            &format!("/seckill/{}/{}", buyer.path, self.sale_id),
        );
        let mut attempt = 0;
        loop {
            let resp = self.http.post(&url).bearer_auth(&buyer.token).send().await;
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    let reason = if e.is_timeout() {
                        "timeout"
                    } else {
                        "connection error"
                    };
                    tally_reject(tally, reason.to_string());
                    return false;
                }
            };
            let status = resp.status();
            if status == StatusCode::ACCEPTED {
                *lock(&tally.last_admit) = Some(Instant::now());
                return true;
            }
            let retry_after = resp
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            let retryable = matches!(status.as_u16(), 429 | 503);
            if let (true, Some(secs)) = (retryable && attempt < retries, retry_after) {
                attempt += 1;
                tally.retried.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(secs.min(2))).await;
                continue;
            }
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            let detail = body["detail"].as_str().unwrap_or("no detail");
            tally_reject(tally, format!("{} {detail}", status.as_u16()));
            return false;
        }
    }

    /// Polls the buyer's result until it is final (`success` or `failed`);
    /// `None` when `deadline` passes first.
    async fn settle(
        &self,
        buyer: &Buyer,
        deadline: Instant,
    ) -> Option<(ResultStatus, Option<String>)> {
        let url = self.url(buyer.gateway, &format!("/sales/{}/result", self.sale_id));
        loop {
            let polled = self.http.get(&url).bearer_auth(&buyer.token).send().await;
            if let Ok(resp) = polled.and_then(|r| r.error_for_status()) {
                let body = resp.json::<Value>().await.unwrap_or_default();
                let status = body["status"].as_str().and_then(|s| s.parse().ok());
                let order = body["order_id"].as_str().map(str::to_string);
                if let Some(s @ (ResultStatus::Success | ResultStatus::Failed)) = status {
                    return Some((s, order));
                }
            }
            if Instant::now() >= deadline {
                tracing::warn!(user = buyer.user, "no final result before the timeout");
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Client {
    /// One buyer pays `order` through the gateway: an idempotency key,
    /// then the pay; `Err` is the refusal, `"<status> <detail>"`.
    async fn pay(&self, buyer: &Buyer, order: &str) -> Result<(), String> {
        let key = self
            .http
            .get(self.url(buyer.gateway, "/idempotency-key"))
            .bearer_auth(&buyer.token)
            .send()
            .await
            .map_err(|e| format!("error {e}"))?;
        let key: Value = key.json().await.map_err(|e| format!("error {e}"))?;
        let key = key["key"].as_str().unwrap_or_default();
        let paid = self
            .http
            .post(self.url(buyer.gateway, &format!("/orders/{order}/pay")))
            .bearer_auth(&buyer.token)
            .header("Idempotency-Key", key)
            .send()
            .await
            .map_err(|e| format!("error {e}"))?;
        let status = paid.status();
        if status == StatusCode::OK {
            return Ok(());
        }
        if status == StatusCode::ACCEPTED {
            // Accepted and settling (always so in the message mode).
            return self.settled(buyer, order).await;
        }
        let body: Value = paid.json().await.unwrap_or_default();
        Err(format!(
            "{} {}",
            status.as_u16(),
            body["detail"].as_str().unwrap_or_default()
        ))
    }
}

impl Client {
    /// Polls `order` until it is paid (the settle after a 202), up to
    /// [`SETTLE_WITHIN`].
    async fn settled(&self, buyer: &Buyer, order: &str) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + SETTLE_WITHIN;
        loop {
            let got = self
                .http
                .get(self.url(buyer.gateway, &format!("/orders/{order}")))
                .bearer_auth(&buyer.token)
                .send()
                .await
                .map_err(|e| format!("error {e}"))?;
            let body: Value = got.json().await.unwrap_or_default();
            if body["status"] == "paid" {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "202 but {} after {SETTLE_WITHIN:?}",
                    body["status"]
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// How long an accepted (202) payment may take to settle in the demo.
const SETTLE_WITHIN: Duration = Duration::from_secs(30);

async fn expect_ok(
    user: u64,
    step: &'static str,
    resp: reqwest::Response,
) -> Result<Value, DemoError> {
    let status = resp.status();
    if status.is_success() {
        let is_json = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        return Ok(if is_json {
            resp.json().await.unwrap_or(Value::Null)
        } else {
            Value::Null
        });
    }
    Err(DemoError::Journey {
        user,
        step,
        status: status.as_u16(),
        body: resp.text().await.unwrap_or_default(),
    })
}

fn tally_reject(tally: &Tally, reason: String) {
    *lock(&tally.rejected).entry(reason).or_default() += 1;
}

/// A poisoned counter lock only means another buyer task panicked; the
/// counts are still right.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One bar per phase, each kept on its own line when done.
fn progress_bar(bars: &MultiProgress, len: u64, phase: &'static str) -> ProgressBar {
    let bar = bars.add(ProgressBar::new(len).with_prefix(phase));
    let style =
        ProgressStyle::with_template("{prefix:>14} [{bar:40}] {pos:>5}/{len:5} {elapsed:>4} {msg}")
            .map(|s| s.progress_chars("=> "));
    if let Ok(style) = style {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listen_is_reached_on_loopback() {
        assert_eq!(gateway_url("0.0.0.0:8080"), "http://127.0.0.1:8080");
        assert_eq!(gateway_url("127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(gateway_url("[::]:8080"), "http://[::1]:8080");
    }
}
