//! The wallet's HTTP surface.
//!
//! | route | who | what |
//! |---|---|---|
//! | `GET /api/v1/wallet` | the buyer (RS256 bearer, through the gateway) | own balance and ledger |
//! | `POST /admin/wallet/credit` | ops (admin token) | a top-up |
//! | `POST /internal/tcc/{try,confirm,cancel}` | the api (service token) | the TCC branch |
//! | `POST /internal/xa/{prepare,commit,rollback}` | the api (service token) | the XA branch |
//! | `GET /internal/xa/prepared` | the api's recovery (service token) | prepared wallet branches |
//! | `POST /internal/message/{debit,resolve}` | the api (service token) | the message mode's debit and check-back |
//! | `GET /internal/audit` | `seckillctl audit --payments` (service token) | the wallet's figures |
//!
//! The internal routes are not behind the gateway; the service token keeps
//! anything else that reaches the wallet's port from moving money.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::accounts::{self, Wallet, WalletFigures};
use super::message::{self, DebitOutcome, Resolution};
use super::tcc::TryOutcome;
use super::xa;
use super::WalletState;
use crate::api::admin::check_secret;
use crate::api::identity::Identity;
use crate::api::openapi::tags;
use crate::api::problem::{ApiJson, Problem, ProblemBody};
use crate::payments::fence::EndOutcome;
use crate::payments::valid_tx_id;

/// The public route, with its OpenAPI description (the api's document
/// lists it too: the gateway serves both under one API).
pub fn public_routes() -> OpenApiRouter<WalletState> {
    OpenApiRouter::new().routes(routes!(own_wallet))
}

/// Admin and internal routes (not in the public document).
pub fn private_routes() -> Router<WalletState> {
    Router::new()
        .route("/admin/wallet/credit", post(credit))
        .route("/internal/tcc/try", post(tcc_try))
        .route("/internal/tcc/confirm", post(tcc_confirm))
        .route("/internal/tcc/cancel", post(tcc_cancel))
        .route("/internal/xa/prepare", post(xa_prepare))
        .route("/internal/xa/commit", post(xa_commit))
        .route("/internal/xa/rollback", post(xa_rollback))
        .route("/internal/xa/prepared", get(xa_prepared))
        .route("/internal/message/debit", post(message_debit))
        .route("/internal/message/resolve", post(message_resolve))
        .route("/internal/audit", get(audit))
}

/// The caller's wallet
///
/// Balance, money held by payments in progress, and the latest movements.
#[utoipa::path(
    get,
    path = "/api/v1/wallet",
    tag = tags::ORDERS,
    operation_id = "get_wallet",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's wallet", body = Wallet),
        (status = 404, description = "Never: a user without money has an empty wallet", body = ProblemBody),
    ),
)]
async fn own_wallet(
    State(state): State<WalletState>,
    who: Identity,
) -> Result<Json<Wallet>, Problem> {
    accounts::statement(state.db(), who.user_id)
        .await
        .map(Json)
        .map_err(Problem::internal)
}

/// Largest single top-up, in cents (a typo guard: 10 million).
const MAX_CREDIT_CENTS: i64 = 1_000_000_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Credit {
    user_id: u64,
    amount_cents: i64,
}

async fn credit(
    State(state): State<WalletState>,
    headers: HeaderMap,
    body: Result<ApiJson<Credit>, Problem>,
) -> Result<Json<Wallet>, Problem> {
    check_secret(state.admin_digest(), &headers, "admin")?;
    let ApiJson(body) = body?;
    if body.user_id == 0 {
        return Err(Problem::bad_request("user_id must be a positive id"));
    }
    if !(1..=MAX_CREDIT_CENTS).contains(&body.amount_cents) {
        return Err(Problem::bad_request(format!(
            "amount_cents must be between 1 and {MAX_CREDIT_CENTS}"
        )));
    }
    let wallet = accounts::credit(state.db(), body.user_id, body.amount_cents)
        .await
        .map_err(Problem::internal)?;
    tracing::info!(
        user_id = body.user_id,
        amount_cents = body.amount_cents,
        "wallet credited"
    );
    Ok(Json(wallet))
}

/// A TCC Try of the wallet branch.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TryRequest {
    pub tx_id: String,
    pub user_id: u64,
    pub order_id: String,
    pub amount_cents: i64,
}

/// An XA prepare of the wallet branch of a group of payments: each
/// payment's debit, in one branch named by the group.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareRequest {
    pub group_id: String,
    pub items: Vec<TryRequest>,
}

/// A Confirm or Cancel (TCC), or a commit or rollback (XA), of the
/// wallet branch.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndRequest {
    pub tx_id: String,
}

/// What a branch call answered.
#[derive(Debug, Serialize, Deserialize)]
pub struct Outcome<T> {
    pub outcome: T,
}

async fn tcc_try(
    State(state): State<WalletState>,
    headers: HeaderMap,
    body: Result<ApiJson<TryRequest>, Problem>,
) -> Result<Json<Outcome<TryOutcome>>, Problem> {
    check_secret(state.service_digest(), &headers, "service")?;
    let ApiJson(r) = body?;
    check_branch_request(&r)?;
    fail::fail_point!("wallet.tcc.before_try", |_| Err(injected()));
    let outcome = state
        .tcc()
        .try_freeze(&r.tx_id, r.user_id, &r.order_id, r.amount_cents)
        .await
        .map_err(Problem::internal)?;
    fail::fail_point!("wallet.tcc.after_try", |_| Err(injected()));
    Ok(Json(Outcome { outcome }))
}

/// A branch request the wallet can act on (ids of the right shape, an
/// amount that is money).
fn check_branch_request(r: &TryRequest) -> Result<(), Problem> {
    if !valid_tx_id(&r.tx_id)
        || r.user_id == 0
        || r.amount_cents < 0
        || !crate::orders::valid_order_id(&r.order_id)
    {
        return Err(Problem::bad_request("malformed branch request"));
    }
    Ok(())
}

async fn xa_prepare(
    State(state): State<WalletState>,
    headers: HeaderMap,
    body: Result<ApiJson<PrepareRequest>, Problem>,
) -> Result<Json<xa::Prepared>, Problem> {
    check_secret(state.service_digest(), &headers, "service")?;
    let ApiJson(r) = body?;
    if !valid_tx_id(&r.group_id) || r.items.is_empty() || r.items.len() > state.xa().max_items() {
        return Err(Problem::bad_request("malformed group prepare"));
    }
    for item in &r.items {
        check_branch_request(item)?;
    }
    fail::fail_point!("wallet.xa.before_prepare", |_| Err(injected()));
    let prepared = xa::prepare(state.db(), state.xa(), &r.group_id, &r.items)
        .await
        .map_err(Problem::internal)?;
    fail::fail_point!("wallet.xa.after_prepare", |_| Err(injected()));
    Ok(Json(prepared))
}

async fn xa_commit(
    State(state): State<WalletState>,
    headers: HeaderMap,
    body: Result<ApiJson<EndRequest>, Problem>,
) -> Result<Json<Outcome<EndOutcome>>, Problem> {
    xa_end(state, headers, body, true).await
}

async fn xa_rollback(
    State(state): State<WalletState>,
    headers: HeaderMap,
    body: Result<ApiJson<EndRequest>, Problem>,
) -> Result<Json<Outcome<EndOutcome>>, Problem> {
    xa_end(state, headers, body, false).await
}

async fn xa_end(
    state: WalletState,
    headers: HeaderMap,
    body: Result<ApiJson<EndRequest>, Problem>,
    commit: bool,
) -> Result<Json<Outcome<EndOutcome>>, Problem> {
    check_secret(state.service_digest(), &headers, "service")?;
    let ApiJson(r) = body?;
    if !valid_tx_id(&r.tx_id) {
        return Err(Problem::bad_request("malformed transaction id"));
    }
    let outcome = xa::end(state.db(), state.xa(), &r.tx_id, commit)
        .await
        .map_err(Problem::internal)?
        .ok_or_else(|| {
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "/problems/branch-busy",
                "the branch is held by another wallet instance for now; retry later",
            )
        })?;
    fail::fail_point!("wallet.xa.after_end", |_| Err(injected()));
    Ok(Json(Outcome { outcome }))
}

async fn message_debit(
    State(state): State<WalletState>,
    headers: HeaderMap,
    body: Result<ApiJson<TryRequest>, Problem>,
) -> Result<Json<Outcome<DebitOutcome>>, Problem> {
    check_secret(state.service_digest(), &headers, "service")?;
    let ApiJson(r) = body?;
    check_branch_request(&r)?;
    let outcome = state
        .debits()
        .debit(&r.tx_id, r.user_id, &r.order_id, r.amount_cents)
        .await
        .map_err(Problem::internal)?;
    if outcome == DebitOutcome::Debited {
        state.wake_relay();
    }
    fail::fail_point!("wallet.message.after_debit", |_| Err(injected()));
    Ok(Json(Outcome { outcome }))
}

async fn message_resolve(
    State(state): State<WalletState>,
    headers: HeaderMap,
    body: Result<ApiJson<EndRequest>, Problem>,
) -> Result<Json<Outcome<Resolution>>, Problem> {
    check_secret(state.service_digest(), &headers, "service")?;
    let ApiJson(r) = body?;
    if !valid_tx_id(&r.tx_id) {
        return Err(Problem::bad_request("malformed transaction id"));
    }
    let outcome = message::resolve(state.db(), &r.tx_id)
        .await
        .map_err(Problem::internal)?;
    Ok(Json(Outcome { outcome }))
}

async fn xa_prepared(
    State(state): State<WalletState>,
    headers: HeaderMap,
) -> Result<Json<Vec<String>>, Problem> {
    check_secret(state.service_digest(), &headers, "service")?;
    xa::prepared(state.db())
        .await
        .map(Json)
        .map_err(Problem::internal)
}

async fn tcc_confirm(
    State(state): State<WalletState>,
    headers: HeaderMap,
    body: Result<ApiJson<EndRequest>, Problem>,
) -> Result<Json<Outcome<EndOutcome>>, Problem> {
    end(state, headers, body, true).await
}

async fn tcc_cancel(
    State(state): State<WalletState>,
    headers: HeaderMap,
    body: Result<ApiJson<EndRequest>, Problem>,
) -> Result<Json<Outcome<EndOutcome>>, Problem> {
    end(state, headers, body, false).await
}

async fn end(
    state: WalletState,
    headers: HeaderMap,
    body: Result<ApiJson<EndRequest>, Problem>,
    confirm: bool,
) -> Result<Json<Outcome<EndOutcome>>, Problem> {
    check_secret(state.service_digest(), &headers, "service")?;
    let ApiJson(r) = body?;
    if !valid_tx_id(&r.tx_id) {
        return Err(Problem::bad_request("malformed transaction id"));
    }
    let outcome = if confirm {
        state.tcc().confirm(&r.tx_id).await
    } else {
        state.tcc().cancel(&r.tx_id).await
    }
    .map_err(Problem::internal)?;
    fail::fail_point!("wallet.tcc.after_end", |_| Err(injected()));
    Ok(Json(Outcome { outcome }))
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    /// How old a `try` must be to count as open.
    open_after_ms: Option<u64>,
}

async fn audit(
    State(state): State<WalletState>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Result<Json<WalletFigures>, Problem> {
    check_secret(state.service_digest(), &headers, "service")?;
    let mut figures = accounts::figures(state.db(), q.open_after_ms.unwrap_or(0))
        .await
        .map_err(Problem::internal)?;
    figures.prepared_xa = xa::prepared(state.db()).await.map_err(Problem::internal)?;
    Ok(Json(figures))
}

/// The answer of a call a fail point cut (tests only: the fail points are
/// compiled in only with the `failpoints` feature).
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn injected() -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "/problems/injected-fault",
        "a fault was injected here",
    )
}
