//! The buyer's orders: list, get, pay, cancel (SPEC §3).
//!
//! Every route takes the user from the verified token ([`Identity`]) and
//! every query is scoped to that user, so nobody can read or change someone
//! else's order: another user's order id answers 404, exactly like an id
//! that does not exist (SPEC invariant 6). The state changes live in
//! [`crate::orders`]; this module maps them to HTTP.
//!
//! Paying is made safe to retry with an `Idempotency-Key` the buyer got
//! from `GET /idempotency-key` ([`super::idempotency`]):
//!
//! ```text
//! POST /orders/{id}/pay  Idempotency-Key: K
//!   lua/workers/idempotency.lua begin(K, order)
//!     unknown ──▶ 400        pending ──▶ 409 (the first request still runs)
//!     mismatch ─▶ 422        replay  ──▶ the first response again
//!     new ──▶ Payments::pay ──▶ finish(K, status, body) ──▶ response
//!                    │   paid now 200, settling 202, paid before (another
//!                    │   key) 409, closed 409, being paid 409, not enough
//!                    │   money 402, not found 404
//!                    └──▶ 5xx: abort(K), the key may be used again
//! ```

use std::sync::LazyLock;

use axum::body::{to_bytes, Body};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use seckill_contracts::redis_client::RedisConn;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::identity::Identity;
use super::problem::{Problem, ProblemBody, PROBLEM_CONTENT_TYPE};
use super::ApiState;
use crate::orders::{self, CancelOutcome, Order};
use crate::payments::{PayError, PayResult};

/// The idempotency script.
pub const IDEMPOTENCY_SCRIPT: &str = include_str!("../../../lua/workers/idempotency.lua");
static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(IDEMPOTENCY_SCRIPT));
/// The request header carrying the key.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// Set on a response that replays a stored one.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// How long the first response of a key is kept for replays.
const REPLAY_TTL_SECS: u64 = 24 * 3600;
/// Largest response body stored for a replay (an order is well under 1 KiB).
const MAX_STORED_BODY: usize = 16 * 1024;

/// `/api/v1/orders` and its sub-routes.
pub fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(show))
        .routes(routes!(pay))
        .routes(routes!(cancel))
}

/// The `{id}` of the order routes, as the document describes it.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct OrderIdParam {
    /// The order's id (a UUID); anyone else's order is a 404.
    #[param(format = Uuid)]
    id: String,
}

/// The pay request's key header, as the document describes it.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct IdempotencyKeyParam {
    /// A key from `GET /api/v1/idempotency-key`, used for this order only.
    #[param(rename = "Idempotency-Key", pattern = "^[0-9a-fA-F]{32}$")]
    idempotency_key: String,
}

fn not_found() -> Problem {
    Problem::not_found("no such order")
}

fn closed_conflict() -> Problem {
    Problem::conflict("/problems/order-closed", "the order is closed")
}

/// The problem type of every "the order is paid" conflict (pay, cancel).
const ORDER_PAID: &str = "/problems/order-paid";

fn paying_conflict() -> Problem {
    Problem::conflict(
        "/problems/payment-in-progress",
        "a payment of this order is in progress; check the order again shortly",
    )
}

/// The caller's orders, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/orders",
    tag = "orders",
    operation_id = "list_orders",
    security(("bearer" = [])),
    responses((status = 200, description = "The caller's own orders", body = Vec<Order>)),
)]
async fn list(State(state): State<ApiState>, who: Identity) -> Result<Json<Vec<Order>>, Problem> {
    orders::list_for_user(state.db(), who.user_id)
        .await
        .map(Json)
        .map_err(Problem::internal)
}

/// One of the caller's orders.
#[utoipa::path(
    get,
    path = "/api/v1/orders/{id}",
    tag = "orders",
    operation_id = "get_order",
    params(OrderIdParam),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The order", body = Order),
        (status = 404, description = "No such order of the caller's", body = ProblemBody),
    ),
)]
async fn show(
    State(state): State<ApiState>,
    who: Identity,
    Path(id): Path<String>,
) -> Result<Json<Order>, Problem> {
    orders::get_for_user(state.db(), who.user_id, &id)
        .await
        .map_err(Problem::internal)?
        .map(Json)
        .ok_or_else(not_found)
}

/// Cancel an unpaid order
///
/// Its unit goes back on sale. Cancelling a closed order answers it as it is.
#[utoipa::path(
    post,
    path = "/api/v1/orders/{id}/cancel",
    tag = "orders",
    operation_id = "cancel_order",
    params(OrderIdParam),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The order, closed", body = Order),
        (status = 404, description = "No such order of the caller's", body = ProblemBody),
        (status = 409, description = "The order is paid, or a payment of it is running", body = ProblemBody),
    ),
)]
async fn cancel(
    State(state): State<ApiState>,
    who: Identity,
    Path(id): Path<String>,
) -> Result<Json<Order>, Problem> {
    let mut redis = state.redis();
    match orders::cancel(state.db(), &mut redis, state.keys(), who.user_id, &id)
        .await
        .map_err(Problem::internal)?
    {
        CancelOutcome::Cancelled(o) | CancelOutcome::AlreadyClosed(o) => Ok(Json(o)),
        CancelOutcome::Paid(_) => Err(Problem::conflict(
            ORDER_PAID,
            "a paid order cannot be cancelled",
        )),
        CancelOutcome::Paying(_) => Err(paying_conflict()),
        CancelOutcome::NotFound => Err(not_found()),
    }
}

/// A well-formed key is what `GET /idempotency-key` issues: 32 hex digits.
fn valid_key(key: &str) -> bool {
    key.len() == 32 && key.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Pay an unpaid order
///
/// A retry with the same key answers what the first request answered
/// (marked `Idempotent-Replayed: true`).
#[utoipa::path(
    post,
    path = "/api/v1/orders/{id}/pay",
    tag = "orders",
    operation_id = "pay_order",
    params(OrderIdParam, IdempotencyKeyParam),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The order, paid", body = Order),
        (status = 202, description = "The payment is accepted and finishing (always so in `message` mode): the order shows `paying` until it is paid", body = Order),
        (status = 400, description = "The Idempotency-Key header is missing, or the key is unknown or expired", body = ProblemBody),
        (status = 402, description = "The wallet's balance does not cover the order; nothing was charged", body = ProblemBody),
        (status = 404, description = "No such order of the caller's", body = ProblemBody),
        (status = 409, description = "The order is closed, already paid or being paid, or a request with this key is still running", body = ProblemBody),
        (status = 422, description = "This key was used for another order", body = ProblemBody),
    ),
)]
async fn pay(
    State(state): State<ApiState>,
    who: Identity,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let key = match idempotency_key(&headers) {
        Ok(k) => k,
        Err(p) => return p.into_response(),
    };
    // An id that cannot exist spends no key.
    if !orders::valid_order_id(&id) {
        return not_found().into_response();
    }
    // A buyer who hangs up must not cut a payment between two steps (an
    // XA branch would wait for recovery, the key would stay pending): the
    // payment runs to its end on a task of its own.
    let paying = tokio::spawn(async move {
        let redis_key = state.keys().idempotency(who.user_id, &key);
        let mut redis = state.redis();
        if let Err(early) = begin(&mut redis, &redis_key, &id).await {
            return early;
        }
        let paid = state.payments().pay(&mut redis, who.user_id, &id).await;
        record(&mut redis, &redis_key, &id, pay_response(paid)).await
    });
    paying
        .await
        .unwrap_or_else(|e| Problem::internal(e).into_response())
}

/// The request's `Idempotency-Key`, lowercased.
fn idempotency_key(headers: &HeaderMap) -> Result<String, Problem> {
    match headers.get(IDEMPOTENCY_HEADER).map(|v| v.to_str()) {
        None => Err(Problem::bad_request(
            "the Idempotency-Key header is required; get one from GET /api/v1/idempotency-key",
        )),
        Some(Ok(k)) if valid_key(k) => Ok(k.to_ascii_lowercase()),
        Some(_) => Err(unknown_key()),
    }
}

/// Takes the key for this request (`begin`); `Err` is the answer when the
/// key cannot be taken: unknown (400), in use (409), used for another
/// order (422), or used before for this one (its first answer, replayed).
async fn begin(redis: &mut RedisConn, redis_key: &str, order_id: &str) -> Result<(), Response> {
    let begun: Vec<String> = SCRIPT
        .key(redis_key)
        .arg("begin")
        .arg(order_id)
        .invoke_async(redis)
        .await
        .map_err(|e| Problem::internal(e).into_response())?;
    let problem = match begun.first().map(String::as_str) {
        Some("new") => return Ok(()),
        Some("replay") => return Err(replay(begun.get(1), begun.get(2))),
        Some("pending") => Problem::conflict(
            "/problems/idempotency-key-in-use",
            "a request with this Idempotency-Key is still being processed; retry shortly",
        ),
        Some("mismatch") => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "/problems/idempotency-key-reused",
            "this Idempotency-Key was used for another order",
        ),
        _ => unknown_key(),
    };
    Err(problem.into_response())
}

fn pay_response(paid: Result<PayResult, PayError>) -> Response {
    match paid {
        Ok(PayResult::Paid(o)) => Json(o).into_response(),
        Ok(PayResult::Settling(o)) => (StatusCode::ACCEPTED, Json(o)).into_response(),
        // Paid under another key: this key's request did not pay (SPEC §3).
        // A retry of the paying request replays its 200 under its own key.
        Ok(PayResult::AlreadyPaid) => {
            Problem::conflict(ORDER_PAID, "the order is already paid").into_response()
        }
        Ok(PayResult::Closed) => closed_conflict().into_response(),
        Ok(PayResult::InProgress) => paying_conflict().into_response(),
        Ok(PayResult::InsufficientFunds) => Problem::new(
            StatusCode::PAYMENT_REQUIRED,
            "/problems/insufficient-funds",
            "your wallet's balance does not cover this order; nothing was charged",
        )
        .into_response(),
        Ok(PayResult::Unavailable) => Problem::unavailable(
            "the payment could not complete; nothing was charged, please retry",
        )
        .into_response(),
        Ok(PayResult::NotFound) => not_found().into_response(),
        Err(e) => Problem::internal(e).into_response(),
    }
}

/// Stores `response` as the key's answer for replays and returns it; a 5xx
/// is our failure, not the buyer's, so the key is given back instead.
async fn record(
    redis: &mut RedisConn,
    redis_key: &str,
    order_id: &str,
    response: Response,
) -> Response {
    let status = response.status();
    if status.is_server_error() {
        finish(redis, redis_key, order_id, &["abort"]).await;
        return response;
    }
    let (parts, body) = response.into_parts();
    let bytes = match to_bytes(body, MAX_STORED_BODY).await {
        Ok(b) => b,
        Err(e) => {
            finish(redis, redis_key, order_id, &["abort"]).await;
            return Problem::internal(e).into_response();
        }
    };
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let code = status.as_u16().to_string();
    let ttl = REPLAY_TTL_SECS.to_string();
    finish(redis, redis_key, order_id, &["finish", &code, &text, &ttl]).await;
    Response::from_parts(parts, Body::from(bytes))
}

fn unknown_key() -> Problem {
    Problem::bad_request(
        "unknown or expired Idempotency-Key; get one from GET /api/v1/idempotency-key",
    )
}

/// Runs `finish` or `abort` of the idempotency script. A failure only
/// means a retry with this key answers 409 until the key expires, so it is
/// logged, not returned.
async fn finish(redis: &mut RedisConn, key: &str, order_id: &str, args: &[&str]) {
    let mut invocation = SCRIPT.key(key);
    invocation.arg(args[0]).arg(order_id);
    for a in &args[1..] {
        invocation.arg(*a);
    }
    if let Err(e) = invocation.invoke_async::<i64>(redis).await {
        tracing::warn!(error = %e, "could not record the pay response for replays");
    }
}

/// The stored first response, sent again.
fn replay(status: Option<&String>, body: Option<&String>) -> Response {
    let status = status
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let content_type = if status.is_success() {
        "application/json"
    } else {
        PROBLEM_CONTENT_TYPE
    };
    let mut response = (status, body.cloned().unwrap_or_default()).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_32_hex_digits() {
        assert!(valid_key("0123456789abcdef0123456789ABCDEF"));
        assert!(!valid_key(""));
        assert!(!valid_key("0123456789abcdef0123456789abcde"));
        assert!(!valid_key("0123456789abcdef0123456789abcdeg"));
        assert!(!valid_key("' OR 1=1 --0123456789abcdef01234"));
    }

    #[test]
    fn a_replay_keeps_status_and_marks_itself() {
        let r = replay(Some(&"409".to_string()), Some(&"{}".to_string()));
        assert_eq!(r.status(), StatusCode::CONFLICT);
        assert_eq!(r.headers()[header::CONTENT_TYPE], PROBLEM_CONTENT_TYPE);
        assert_eq!(r.headers()[REPLAYED_HEADER], "true");
    }
}
