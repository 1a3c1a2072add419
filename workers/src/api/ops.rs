//! The `/ops` dashboard's data and actions (admin bearer token), reached
//! through the gateway at `/ops/api/...`:
//!
//! | route | what |
//! |---|---|
//! | `GET /ops/api/sales/{id}` | one sale's live figures (below) |
//! | `POST /ops/api/sales/{id}/audit` | `seckillctl audit` for the sale |
//! | `POST /ops/api/dlq/replay` | dead-lettered orders back into the queue |
//! | `POST /ops/api/rules/reload` | every live gateway reloads its rules |
//!
//! ```text
//!  MySQL: orders by status ─┐
//!  Redis: stock left ───────┤
//!  RabbitMQ: queue depths ──┼──▶ SaleFigures (JSON), one read per call
//!  fleet reports (Redis): ──┘    counts are cumulative: the page takes
//!    decisions, latencies,       rates as the difference of two reads
//!    health of each process
//! ```
//!
//! Nothing is kept between calls, so any api instance answers any
//! dashboard. The reload goes to each gateway's admin listener (its
//! address is in its fleet report) with the caller's admin token: one
//! deployment has one admin token.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use seckill_contracts::admission_answers::{refusal_reason, ADMITTED, REFUSAL_REASONS};
use seckill_contracts::fleet::{self, Histogram, Member, Role};
use serde::Serialize;
use serde_json::{json, Value};

use super::admin::check_admin;
use super::problem::{parse_sale_id, Problem};
use super::sales_cache::{self, SaleView};
use super::ApiState;
use crate::audit::{self, AuditError};
use crate::statuses::OrderStatus;
use crate::worker::dlq;

/// How long the dashboard's audit waits for a draining sale to be quiet.
const AUDIT_WAIT: Duration = Duration::from_secs(2);
/// Dead-lettered messages one replay moves at most.
const REPLAY_LIMIT: usize = 10_000;
/// A gateway's reload answer (compile and selftest included) within this.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(15);
/// A queue-depth read within this, else the queue figures are `null`.
const BROKER_TIMEOUT: Duration = Duration::from_secs(2);

/// `/ops/api/...`.
pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/ops/api/sales/{id}", get(sale_figures))
        .route("/ops/api/sales/{id}/audit", post(run_audit))
        .route("/ops/api/dlq/replay", post(replay_dlq))
        .route("/ops/api/rules/reload", post(reload_rules))
}

/// One sale's live figures.
#[derive(Debug, Serialize)]
pub struct SaleFigures {
    pub server_time: String,
    pub sale: SaleView,
    pub stock_left: u64,
    pub orders: OrderCounts,
    pub failed_results: i64,
    pub queue: Option<QueueFigures>,
    /// Buyers queued, summed over the live gateways (cumulative).
    pub admissions: u64,
    /// Refusals by shown reason (cumulative), every reason present.
    pub refusals: BTreeMap<&'static str, u64>,
    /// Every outcome counted for the sale (cumulative).
    pub decisions: BTreeMap<String, u64>,
    pub latency_ms: BTreeMap<&'static str, Percentiles>,
    pub processes: Vec<ProcessView>,
}

#[derive(Debug, Default, Serialize)]
pub struct OrderCounts {
    pub unpaid: i64,
    pub paid: i64,
    pub closed: i64,
    /// Orders written, whatever their status since.
    pub committed: i64,
}

#[derive(Debug, Serialize)]
pub struct QueueFigures {
    pub orders: u32,
    pub dead_letter: u32,
    pub consumers: u32,
}

/// Percentiles in milliseconds (`None` without observations).
#[derive(Debug, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

impl Percentiles {
    fn of(h: &Histogram) -> Percentiles {
        let ms = |q| h.quantile(q).map(|s| (s * 1000.0 * 100.0).round() / 100.0);
        Percentiles {
            count: h.count,
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
        }
    }
}

/// A process as the dashboard lists it.
#[derive(Debug, Serialize)]
pub struct ProcessView {
    pub role: Role,
    pub id: String,
    pub version: String,
    pub live: bool,
    pub seen_ms_ago: u64,
    /// Live and every dependency answering.
    pub healthy: bool,
    pub health: BTreeMap<String, bool>,
    pub rules: Option<fleet::RulesReport>,
}

async fn sale_figures(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Json<SaleFigures>, Problem> {
    check_admin(&state, &headers)?;
    let id = parse_sale_id(&raw)?;
    // Independent reads of four stores: the answer waits for the slowest,
    // not for their sum.
    let members = async {
        fleet::members(&mut state.redis(), state.keys())
            .await
            .map_err(Problem::internal)
    };
    let (sale, orders, failed_results, members, queue) = tokio::join!(
        sales_cache::sale_view(&state, id),
        order_counts(&state, id),
        failed_results(&state, id),
        members,
        queue_figures(&state),
    );
    let sale = sale?.ok_or_else(|| Problem::not_found(format!("no sale with id {id}")))?;
    Ok(Json(figures(
        sale,
        orders?,
        failed_results?,
        queue,
        &members?,
    )))
}

/// Puts the read parts together (pure, so its sums are unit-tested).
fn figures(
    sale: SaleView,
    orders: OrderCounts,
    failed_results: i64,
    queue: Option<QueueFigures>,
    members: &[Member],
) -> SaleFigures {
    let live = || members.iter().filter(|m| m.live).map(|m| &m.report);
    let mut decisions: BTreeMap<String, u64> = BTreeMap::new();
    for report in live() {
        for (outcome, n) in report.decisions.get(&sale.id).into_iter().flatten() {
            *decisions.entry(outcome.clone()).or_default() += n;
        }
    }
    let mut refusals: BTreeMap<&'static str, u64> =
        REFUSAL_REASONS.iter().map(|r| (*r, 0)).collect();
    for (outcome, n) in &decisions {
        if let Some(reason) = refusal_reason(outcome) {
            *refusals.entry(reason).or_default() += n;
        }
    }
    let mut latency_ms = BTreeMap::new();
    for name in ["publish_confirm", "end_to_end"] {
        let mut total = Histogram::default();
        for report in live() {
            if let Some(h) = report.latency.get(name) {
                total.add(h);
            }
        }
        latency_ms.insert(name, Percentiles::of(&total));
    }
    SaleFigures {
        server_time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        stock_left: sale.stock_left,
        sale,
        orders,
        failed_results,
        queue,
        admissions: decisions.get(ADMITTED).copied().unwrap_or(0),
        refusals,
        decisions,
        latency_ms,
        processes: members.iter().map(process_view).collect(),
    }
}

fn process_view(m: &Member) -> ProcessView {
    let r = &m.report;
    ProcessView {
        role: r.role,
        id: r.id.clone(),
        version: r.version.clone(),
        live: m.live,
        seen_ms_ago: m.seen_ms_ago,
        healthy: m.live && r.healthy(),
        health: r.health.clone(),
        rules: r.rules.clone(),
    }
}

async fn order_counts(state: &ApiState, sale_id: u64) -> Result<OrderCounts, Problem> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, COUNT(*) FROM orders WHERE sale_id = ? GROUP BY status")
            .bind(sale_id)
            .fetch_all(state.db())
            .await
            .map_err(Problem::internal)?;
    let mut counts = OrderCounts::default();
    for (status, n) in rows {
        match status.parse::<OrderStatus>() {
            // A payment in progress is still awaiting its money.
            Ok(OrderStatus::Unpaid | OrderStatus::Paying) => counts.unpaid += n,
            Ok(OrderStatus::Paid) => counts.paid += n,
            Ok(OrderStatus::Closed) => counts.closed += n,
            Err(e) => return Err(Problem::internal(e)),
        }
        counts.committed += n;
    }
    Ok(counts)
}

async fn failed_results(state: &ApiState, sale_id: u64) -> Result<i64, Problem> {
    sqlx::query_scalar("SELECT COUNT(*) FROM failed_admissions WHERE sale_id = ?")
        .bind(sale_id)
        .fetch_one(state.db())
        .await
        .map_err(Problem::internal)
}

/// The order queue's and the DLQ's depth; `None` when the broker does not
/// answer in time (the rest of the figures still come).
async fn queue_figures(state: &ApiState) -> Option<QueueFigures> {
    let read = async {
        let broker = state.ops_broker().await?;
        let amqp = &state.full_config().amqp;
        let (main, dead) = tokio::join!(
            audit::queue_figures(&broker, &amqp.queue),
            audit::queue_figures(&broker, &amqp.dead_letter_queue),
        );
        let ((orders, consumers), (dead_letter, _)) = (main?, dead?);
        Ok::<_, lapin::Error>(QueueFigures {
            orders,
            dead_letter,
            consumers,
        })
    };
    match tokio::time::timeout(BROKER_TIMEOUT, read).await {
        Ok(Ok(q)) => Some(q),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "ops: queue depth not read");
            state.drop_ops_broker().await;
            None
        }
        Err(_) => None,
    }
}

async fn run_audit(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Json<audit::AuditReport>, Problem> {
    check_admin(&state, &headers)?;
    let id = parse_sale_id(&raw)?;
    let mut redis = state.redis();
    audit::run(state.full_config(), state.db(), &mut redis, id, AUDIT_WAIT)
        .await
        .map(Json)
        .map_err(|e| match e {
            AuditError::UnknownSale(id) => Problem::not_found(format!("no sale with id {id}")),
            AuditError::Broker(e) => Problem::unavailable(format!("RabbitMQ: {e}")),
            other => Problem::internal(other),
        })
}

async fn replay_dlq(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Json<Value>, Problem> {
    check_admin(&state, &headers)?;
    let replayed = dlq::replay(state.full_config(), REPLAY_LIMIT, None)
        .await
        .map_err(|e| Problem::unavailable(format!("RabbitMQ: {e}")))?;
    Ok(Json(json!({ "replayed": replayed.len() })))
}

/// One gateway's answer to the reload.
#[derive(Debug, Serialize)]
struct GatewayReload {
    id: String,
    /// The gateway's HTTP status; `None` when it could not be reached.
    status: Option<u16>,
    body: Value,
}

async fn reload_rules(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Value>), Problem> {
    check_admin(&state, &headers)?;
    let token = super::admin::bearer(&headers)
        .unwrap_or_default()
        .to_string();
    let members = fleet::members(&mut state.redis(), state.keys())
        .await
        .map_err(Problem::internal)?;
    let gateways: Vec<_> = members
        .iter()
        .filter(|m| m.live && m.report.role == Role::Gateway)
        .filter_map(|m| Some((m.report.id.clone(), m.report.admin_url.clone()?)))
        .collect();
    if gateways.is_empty() {
        return Err(Problem::new(
            StatusCode::BAD_GATEWAY,
            "no-gateway",
            "no live gateway reports an admin address",
        ));
    }
    let http = reqwest::Client::new();
    let answers = futures::future::join_all(
        gateways
            .into_iter()
            .map(|(id, url)| reload_one(&http, id, url, &token)),
    )
    .await;
    let status = reload_status(&answers);
    let ok = status == StatusCode::OK;
    Ok((status, Json(json!({ "ok": ok, "gateways": answers }))))
}

async fn reload_one(http: &reqwest::Client, id: String, url: String, token: &str) -> GatewayReload {
    let sent = http
        .post(format!("{url}/admin/rules/reload"))
        .bearer_auth(token)
        .timeout(RELOAD_TIMEOUT)
        .send()
        .await;
    match sent {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let body = resp.json::<Value>().await.unwrap_or(Value::Null);
            GatewayReload {
                id,
                status: Some(status),
                body,
            }
        }
        Err(e) => GatewayReload {
            id,
            status: None,
            body: json!({ "detail": format!("unreachable: {e}") }),
        },
    }
}

/// 200 when every gateway reloaded, 422 when one refused the rules (the
/// others may have taken them: each answer says), 502 otherwise.
fn reload_status(answers: &[GatewayReload]) -> StatusCode {
    if answers.iter().all(|a| a.status == Some(200)) {
        StatusCode::OK
    } else if answers.iter().any(|a| a.status == Some(422)) {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::BAD_GATEWAY
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use seckill_contracts::fleet::MemberReport;

    fn sale(id: u64) -> SaleView {
        SaleView {
            id,
            goods_id: 1,
            title: "t".into(),
            price_cents: 2,
            sale_price_cents: 1,
            stock_total: 10,
            stock_left: 4,
            starts_at: "2026-12-03T00:00:00Z".into(),
            ends_at: "2026-12-03T01:00:00Z".into(),
            status: sales_cache::SaleStatus::Active,
        }
    }

    fn gateway(id: &str, live: bool, counts: &[(&str, u64)]) -> Member {
        let mut r = MemberReport::new(Role::Gateway, id, 0);
        let by_outcome = counts.iter().map(|(o, n)| (o.to_string(), *n)).collect();
        r.decisions.insert(7, by_outcome);
        r.latency.insert(
            "publish_confirm".into(),
            Histogram {
                bounds: vec![0.001, 0.01],
                counts: vec![1, 2],
                count: 2,
            },
        );
        Member {
            report: r,
            live,
            seen_ms_ago: 0,
        }
    }

    #[test]
    fn figures_sum_live_gateways_and_group_refusals() {
        let members = [
            gateway(
                "a",
                true,
                &[("queued", 3), ("sold_out", 10), ("gateway_limited", 1)],
            ),
            gateway("b", true, &[("queued", 2), ("limited", 4), ("released", 1)]),
            gateway("dead", false, &[("queued", 100)]),
        ];
        let f = figures(sale(7), OrderCounts::default(), 0, None, &members);
        assert_eq!(f.admissions, 5, "the dead gateway's counts are left out");
        assert_eq!(f.refusals["sold_out"], 10);
        assert_eq!(f.refusals["limited"], 5);
        assert_eq!(f.refusals["could_not_enqueue"], 1);
        assert_eq!(f.refusals["duplicate"], 0, "every reason is present");
        assert_eq!(f.decisions["queued"], 5);
        assert_eq!(f.latency_ms["publish_confirm"].count, 4);
        assert_eq!(f.latency_ms["end_to_end"].count, 0);
        assert_eq!(f.latency_ms["end_to_end"].p99, None);
        assert_eq!(f.processes.len(), 3);
        assert!(!f.processes[2].healthy, "a silent process is not healthy");
    }

    #[test]
    fn a_refusal_from_any_gateway_makes_the_reload_a_422() {
        let answer = |status| GatewayReload {
            id: "g".into(),
            status,
            body: Value::Null,
        };
        assert_eq!(reload_status(&[answer(Some(200))]), StatusCode::OK);
        assert_eq!(
            reload_status(&[answer(Some(200)), answer(Some(422))]),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            reload_status(&[answer(Some(200)), answer(None)]),
            StatusCode::BAD_GATEWAY
        );
    }
}
