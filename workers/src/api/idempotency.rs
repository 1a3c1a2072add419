//! Issuing idempotency keys for paying.
//!
//! `POST /orders/{id}/pay` requires an `Idempotency-Key` the server issued,
//! so a retried payment (lost response, double click) is recognised and
//! answered with the first response instead of paying twice. Keys are
//! random 128-bit values bound to the user: `KeySchema.idempotency(user,
//! key)` holds `"issued"` for `api.idempotency_key_ttl_secs` until the pay
//! route consumes it.

use axum::extract::State;
use axum::Json;
use rand::RngCore;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::identity::Identity;
use super::problem::Problem;
use super::ApiState;

/// The value an unused key holds.
pub const ISSUED: &str = "issued";

/// A pay request's idempotency key.
#[derive(Debug, Serialize, ToSchema)]
pub struct IssuedKey {
    /// For the `Idempotency-Key` header of one pay request.
    #[schema(pattern = "^[0-9a-f]{32}$")]
    pub key: String,
    /// Seconds the key can be used.
    pub expires_in: u64,
}

/// `/api/v1/idempotency-key`.
pub fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(issue))
}

/// A fresh key that makes one pay request safe to retry.
#[utoipa::path(
    get,
    path = "/api/v1/idempotency-key",
    tag = "orders",
    operation_id = "get_idempotency_key",
    security(("bearer" = [])),
    responses((status = 200, description = "A new key", body = IssuedKey)),
)]
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
