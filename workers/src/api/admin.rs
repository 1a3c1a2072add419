//! The api's admin route: creating a sale over HTTP (SPEC §4).
//!
//! Guarded by the admin bearer token (`api.admin_token` or
//! `api.admin_token_path`), compared in constant time over SHA-256 digests
//! so neither the content nor the length of the token leaks through timing.
//! Creation goes through [`crate::sales::create`] (MySQL first, then the
//! Redis warm-up, which never raises a live sale's stock) and then deletes
//! the sale's cache entry, so a "no such sale" marker cached for a probed id
//! cannot hide the new sale.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::problem::{ApiJson, Problem};
use super::sales_cache::{self, SaleView};
use super::ApiState;
use crate::sales::{self, NewSale, SaleError};

/// Request body of `POST /admin/sales`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSale {
    pub title: String,
    pub price_cents: i64,
    pub sale_price_cents: i64,
    pub stock: u32,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
}

/// `/admin/sales`.
pub fn router() -> Router<ApiState> {
    Router::new().route("/admin/sales", post(create))
}

/// SHA-256 of a token, what the state keeps instead of the token.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Constant-time equality of two digests.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer token of the request, if it sent one.
pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
}

/// Passes when the request carries the admin token (every admin and ops
/// route calls this first, before looking at the body).
pub(super) fn check_admin(state: &ApiState, headers: &HeaderMap) -> Result<(), Problem> {
    check_secret(state.admin_digest(), headers, "admin")
}

/// Passes when the request's bearer token is the secret whose digest is
/// `expected` (`what` names it in the answers: "admin", "service").
pub fn check_secret(
    expected: Option<&[u8; 32]>,
    headers: &HeaderMap,
    what: &str,
) -> Result<(), Problem> {
    let Some(expected) = expected else {
        return Err(Problem::unavailable(format!(
            "these routes are disabled: no {what} token is configured"
        )));
    };
    match bearer(headers) {
        Some(token) if same(&digest(token), expected) => Ok(()),
        _ => Err(Problem::unauthorized(format!(
            "a valid {what} bearer token is required"
        ))),
    }
}

async fn create(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<ApiJson<CreateSale>, Problem>,
) -> Result<(StatusCode, Json<SaleView>), Problem> {
    // Authenticate before looking at the body.
    check_admin(&state, &headers)?;
    let ApiJson(body) = body?;
    let new = NewSale {
        title: body.title,
        price_cents: body.price_cents,
        sale_price_cents: body.sale_price_cents,
        stock: body.stock,
        starts_at: body.starts_at,
        ends_at: body.ends_at,
    };
    let mut redis = state.redis();
    let sale = sales::create(state.db(), &mut redis, state.keys(), &new)
        .await
        .map_err(|e| match e {
            SaleError::Invalid(why) => Problem::bad_request(why),
            other => Problem::internal(other),
        })?;
    sales_cache::invalidate(&mut redis, state.keys(), sale.id)
        .await
        .map_err(Problem::internal)?;
    let view = sales_cache::sale_view(&state, sale.id)
        .await?
        .ok_or_else(|| Problem::internal("sale vanished after creation"))?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_compare() {
        assert!(same(&digest("a"), &digest("a")));
        assert!(!same(&digest("a"), &digest("b")));
    }
}
