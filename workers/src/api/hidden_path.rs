//! Issuing the hidden seckill path after a solved captcha.
//!
//! The purchase URL `POST /api/v1/seckill/{path}/{sale_id}` contains a
//! random 128-bit path bound to (user, sale) and valid for
//! `api.path_ttl_secs`, so the URL cannot be known before the sale starts
//! nor shared between buyers. The path is only handed out for a correct
//! captcha answer, and the stored answer is consumed atomically (`GETDEL`)
//! before it is compared: one try per captcha, whatever the outcome, so
//! answers cannot be brute-forced against one image.
//!
//! Redis value format (read by the gateway's admission script): the key
//! `KeySchema.sale(id).path(user)` holds the path as 32 lowercase hex
//! characters, with a TTL of `api.path_ttl_secs`.

use axum::extract::{Path, State};
use axum::Json;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::identity::Identity;
use super::problem::{parse_sale_id, ApiJson, Problem, ProblemBody, SaleIdParam};
use super::sales_cache::{self, SaleStatus};
use super::ApiState;

/// The answer as sent: a JSON integer or a string of digits (form fields
/// often arrive as strings).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Answer {
    Number(i64),
    Text(String),
}

impl Answer {
    fn value(&self) -> Option<i64> {
        match self {
            Answer::Number(n) => Some(*n),
            Answer::Text(s) => {
                let s = s.trim();
                (!s.is_empty() && s.len() <= 12)
                    .then(|| s.parse::<i64>().ok())
                    .flatten()
            }
        }
    }
}

/// The captcha's answer, traded for the hidden path.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PathRequest {
    /// The captcha's result, as a number or its decimal text.
    #[schema(value_type = i64, example = 13)]
    pub captcha_answer: Answer,
}

/// The buyer's hidden path for one sale.
#[derive(Debug, Serialize, ToSchema)]
pub struct IssuedPath {
    /// The hidden path for `POST /api/v1/seckill/{path}/{sale_id}`.
    #[schema(pattern = "^[0-9a-f]{32}$")]
    pub path: String,
    /// Seconds the path stays valid.
    pub expires_in: u64,
}

/// A fresh random 128-bit path as 32 lowercase hex characters.
pub fn new_path() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// `/api/v1/sales/{id}/path`.
pub fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(issue))
}

/// Trade the captcha's answer for the hidden path
///
/// Only for an active sale; the captcha is spent whatever the answer.
#[utoipa::path(
    post,
    path = "/api/v1/sales/{id}/path",
    tag = "sales",
    operation_id = "issue_path",
    params(SaleIdParam),
    request_body = PathRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The hidden path", body = IssuedPath),
        (status = 400, description = "Wrong answer, or no captcha pending (expired or already used)", body = ProblemBody),
        (status = 404, description = "No such sale", body = ProblemBody),
        (status = 409, description = "The sale is not active", body = ProblemBody),
    ),
)]
async fn issue(
    State(state): State<ApiState>,
    who: Identity,
    Path(raw): Path<String>,
    ApiJson(body): ApiJson<PathRequest>,
) -> Result<Json<IssuedPath>, Problem> {
    let sale_id = parse_sale_id(&raw)?;
    let keys = state.keys().sale(sale_id);
    let mut redis = state.redis();
    // Consume first: the captcha is spent whatever happens next.
    let stored: Option<String> = redis::cmd("GETDEL")
        .arg(keys.captcha(who.user_id))
        .query_async(&mut redis)
        .await
        .map_err(Problem::internal)?;
    let expected = stored.and_then(|s| s.parse::<i64>().ok());
    let given = body.captcha_answer.value();
    match (expected, given) {
        (Some(e), Some(g)) if e == g => {}
        (None, _) => {
            return Err(Problem::new(
                axum::http::StatusCode::BAD_REQUEST,
                "/problems/captcha-missing",
                "no captcha is pending for this sale (expired or already used); fetch a new one",
            ))
        }
        _ => {
            return Err(Problem::new(
                axum::http::StatusCode::BAD_REQUEST,
                "/problems/captcha-wrong",
                "wrong captcha answer; the captcha is spent, fetch a new one",
            ))
        }
    }
    let sale = sales_cache::sale_view(&state, sale_id)
        .await?
        .ok_or_else(|| Problem::not_found("no such sale"))?;
    // In the buyer's words, as the seckill route says them.
    let refusal = match sale.status {
        SaleStatus::Active => None,
        SaleStatus::Upcoming => Some("the sale has not started yet"),
        SaleStatus::SoldOut => Some("sold out"),
        SaleStatus::Ended => Some("the sale has ended"),
    };
    if let Some(detail) = refusal {
        return Err(Problem::conflict("/problems/sale-not-active", detail));
    }
    let path = new_path();
    let ttl = state.config().path_ttl_secs.max(1);
    let _: () = redis::cmd("SET")
        .arg(keys.path(who.user_id))
        .arg(&path)
        .arg("EX")
        .arg(ttl)
        .query_async(&mut redis)
        .await
        .map_err(Problem::internal)?;
    Ok(Json(IssuedPath {
        path,
        expires_in: ttl,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_128_bit_hex_and_distinct() {
        let a = new_path();
        assert_eq!(a.len(), 32);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(a, new_path());
    }

    #[test]
    fn answers_parse() {
        assert_eq!(Answer::Number(13).value(), Some(13));
        assert_eq!(Answer::Text(" 13 ".into()).value(), Some(13));
        assert_eq!(Answer::Text("x".into()).value(), None);
        assert_eq!(Answer::Text("9".repeat(40)).value(), None);
    }
}
