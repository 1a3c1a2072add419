//! `GET /.well-known/jwks.json`: the public halves of the keys this api's
//! tokens are verified with, as a JSON Web Key Set (RFC 7517).
//!
//! The key set is the verifier's own ([`JwtVerifier::jwks`]): the
//! configured `jwt.public_keys` plus the keyring's keys in force, reread in
//! the background (`api::keys`), so what is published is exactly what this
//! instance accepts, a rotated key included before it signs. Anything that verifies tokens (a gateway, another
//! service) can take its keys from here instead of a copied PEM file.
//! Public: the keys are not secrets.
//!
//! [`JwtVerifier::jwks`]: seckill_contracts::jwt::JwtVerifier::jwks

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::problem::Problem;
use super::ApiState;

/// How long a client may keep the key set before asking again: short, so
/// a newly added key is seen within a minute.
const CACHE_CONTROL: &str = "public, max-age=60";

pub fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(jwks))
}

/// The public keys access tokens are verified with (RFC 7517).
#[utoipa::path(
    get,
    path = "/.well-known/jwks.json",
    tag = "keys",
    operation_id = "get_jwks",
    responses((status = 200, description = "The key set: RS256 keys by `kid`", body = Object)),
)]
async fn jwks(State(state): State<ApiState>) -> Result<Response, Problem> {
    let verifier = state
        .verifier()
        .ok_or_else(|| Problem::unavailable("the public keys are not loaded on this instance"))?;
    Ok((
        [(header::CACHE_CONTROL, CACHE_CONTROL)],
        Json(verifier.jwks().clone()),
    )
        .into_response())
}
