//! The wallet's HTTP surface.
//!
//! | route | who | what |
//! |---|---|---|
//! | `GET /api/v1/wallet` | the buyer (RS256 bearer, through the gateway) | own balance and ledger |
//! | `POST /admin/wallet/credit` | ops (admin token) | a top-up |
//! | `POST /internal/tcc/{try,confirm,cancel}` | the api (service token) | the TCC branch, a [`Batch`] of payments per call |
//! | `POST /internal/xa/{prepare,commit,rollback}` | the api (service token) | the XA branch of a group of payments |
//! | `GET /internal/xa/prepared` | the api's recovery (service token) | prepared wallet branches |
//! | `POST /internal/message/{debit,resolve}` | the api (service token) | the message mode's debit (a [`Batch`]) and check-back |
//! | `GET /internal/audit` | `seckillctl audit --payments` (service token) | the wallet's figures |
//!
//! The internal routes are not behind the gateway; the service token keeps
//! anything else that reaches the wallet's port from moving money.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::future::join_all;
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

/// A TCC Try of the wallet branch (and the other modes' first call).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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

/// The same branch call for many payments at once: the api sends its
/// concurrent payments' calls together, and each still gets its own
/// answer. Nothing in a batch waits for another item: each joins the
/// wallet's group commit, as calls arriving together would.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch<T> {
    pub items: Vec<T>,
}

/// A batch's answers, one per item in the batch's order.
#[derive(Debug, Serialize, Deserialize)]
pub struct BatchAnswer<T> {
    pub answers: Vec<ItemAnswer<T>>,
}

/// One item's answer: its outcome, or the error that stopped it (which,
/// like a `500` for a call alone, may or may not have taken effect).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemAnswer<T> {
    Outcome(T),
    Error(String),
}

impl<T> ItemAnswer<T> {
    fn of<E: std::fmt::Display>(result: Result<T, E>) -> ItemAnswer<T> {
        match result {
            Ok(outcome) => ItemAnswer::Outcome(outcome),
            Err(e) => {
                tracing::error!(error = %e, "a wallet branch call failed");
                ItemAnswer::Error(e.to_string())
            }
        }
    }
}

/// A batch the wallet takes: 1 to `payment.group_commit_max` items, each
/// well formed (else nothing in it runs).
fn check_batch<T>(
    state: &WalletState,
    items: &[T],
    check: impl Fn(&T) -> Result<(), Problem>,
) -> Result<(), Problem> {
    if items.is_empty() || items.len() > state.batch_max() {
        return Err(Problem::bad_request(format!(
            "a batch carries 1 to {} items",
            state.batch_max()
        )));
    }
    items.iter().try_for_each(check)
}

async fn tcc_try(
    State(state): State<WalletState>,
    headers: HeaderMap,
    body: Result<ApiJson<Batch<TryRequest>>, Problem>,
) -> Result<Json<BatchAnswer<TryOutcome>>, Problem> {
    check_secret(state.service_digest(), &headers, "service")?;
    let ApiJson(r) = body?;
    check_batch(&state, &r.items, check_branch_request)?;
    fail::fail_point!("wallet.tcc.before_try", |_| Err(injected()));
    let tries = r.items.iter().map(|t| {
        state
            .tcc()
            .try_freeze(&t.tx_id, t.user_id, &t.order_id, t.amount_cents)
    });
    let answers = join_all(tries).await.into_iter().map(ItemAnswer::of);
    fail::fail_point!("wallet.tcc.after_try", |_| Err(injected()));
    Ok(Json(BatchAnswer {
        answers: answers.collect(),
    }))
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
    if !valid_tx_id(&r.group_id) {
        return Err(Problem::bad_request("malformed group prepare"));
    }
    check_batch(&state, &r.items, check_branch_request)?;
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
    body: Result<ApiJson<Batch<TryRequest>>, Problem>,
) -> Result<Json<BatchAnswer<DebitOutcome>>, Problem> {
    check_secret(state.service_digest(), &headers, "service")?;
    let ApiJson(r) = body?;
    check_batch(&state, &r.items, check_branch_request)?;
    let debits = r.items.iter().map(|t| {
        state
            .debits()
            .debit(&t.tx_id, t.user_id, &t.order_id, t.amount_cents)
    });
    let answers: Vec<_> = join_all(debits)
        .await
        .into_iter()
        .map(ItemAnswer::of)
        .collect();
    if answers
        .iter()
        .any(|a| matches!(a, ItemAnswer::Outcome(DebitOutcome::Debited)))
    {
        state.wake_relay();
    }
    fail::fail_point!("wallet.message.after_debit", |_| Err(injected()));
    Ok(Json(BatchAnswer { answers }))
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
    body: Result<ApiJson<Batch<EndRequest>>, Problem>,
) -> Result<Json<BatchAnswer<EndOutcome>>, Problem> {
    end(state, headers, body, true).await
}

async fn tcc_cancel(
    State(state): State<WalletState>,
    headers: HeaderMap,
    body: Result<ApiJson<Batch<EndRequest>>, Problem>,
) -> Result<Json<BatchAnswer<EndOutcome>>, Problem> {
    end(state, headers, body, false).await
}

async fn end(
    state: WalletState,
    headers: HeaderMap,
    body: Result<ApiJson<Batch<EndRequest>>, Problem>,
    confirm: bool,
) -> Result<Json<BatchAnswer<EndOutcome>>, Problem> {
    check_secret(state.service_digest(), &headers, "service")?;
    let ApiJson(r) = body?;
    check_batch(&state, &r.items, |e| {
        if valid_tx_id(&e.tx_id) {
            Ok(())
        } else {
            Err(Problem::bad_request("malformed transaction id"))
        }
    })?;
    let ends = r.items.iter().map(|e| {
        let tcc = state.tcc();
        async move {
            if confirm {
                tcc.confirm(&e.tx_id).await
            } else {
                tcc.cancel(&e.tx_id).await
            }
        }
    });
    let answers = join_all(ends).await.into_iter().map(ItemAnswer::of);
    fail::fail_point!("wallet.tcc.after_end", |_| Err(injected()));
    Ok(Json(BatchAnswer {
        answers: answers.collect(),
    }))
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
