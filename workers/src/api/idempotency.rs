//! Issuing idempotency keys for paying.
//!
//! `POST /orders/{id}/pay` requires an `Idempotency-Key` the server issued,
//! so a retried payment (lost response, double click) is recognised and
//! answered with the first response instead of paying twice. Keys are
//! random 128-bit values bound to the user: `KeySchema.idempotency(user,
//! key)` holds `"issued"` for `api.idempotency_key_ttl_secs` until the pay
//! route consumes it.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use rand::RngCore;
use serde::Serialize;

use super::identity::Identity;
use super::problem::Problem;
use super::ApiState;

/// The value an unused key holds.
pub const ISSUED: &str = "issued";

/// `200` body.
#[derive(Debug, Serialize)]
pub struct IssuedKey {
    pub key: String,
    pub expires_in: u64,
}

/// `/api/v1/idempotency-key`.
pub fn router() -> Router<ApiState> {
    Router::new().route("/api/v1/idempotency-key", get(issue))
}

async fn issue(State(state): State<ApiState>, who: Identity) -> Result<Json<IssuedKey>, Problem> {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    let key = hex::encode(bytes);
    let ttl = state.config().idempotency_key_ttl_secs.max(1);
    let mut redis = state.redis();
    let _: () = redis::cmd("SET")
        .arg(state.keys().idempotency(who.user_id, &key))
        .arg(ISSUED)
        .arg("EX")
        .arg(ttl)
        .query_async(&mut redis)
        .await
        .map_err(Problem::internal)?;
    Ok(Json(IssuedKey {
        key,
        expires_in: ttl,
    }))
}
