//! Who is calling: the `Authorization: Bearer` RS256 token, verified here.
//!
//! The gateway already verified the token, but the api checks it again
//! (defence in depth): an api instance reachable without the gateway, or a
//! gateway route misconfigured as public, must not let anyone act as another
//! user. It is the very verifier the gateway runs
//! (`seckill_contracts::jwt`): RS256 only, a known `kid`, `exp`/`nbf` with
//! at most 5 s leeway, exact `iss` and `aud`, a positive user id in `sub`.
//! The `X-User-Id` header the gateway adds is ignored entirely: only a
//! verified token establishes identity.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;

use super::problem::Problem;
use super::ApiState;

/// The verified caller of an authenticated route. Extracting it is the
/// route's authentication: a handler taking `Identity` can only run for a
/// valid token.
#[derive(Debug, Clone)]
pub struct Identity {
    /// From the verified `sub`; never from `X-User-Id`.
    pub user_id: u64,
    pub username: String,
}

impl FromRequestParts<ApiState> for Identity {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Problem> {
        let Some(verifier) = state.verifier() else {
            return Err(Problem::unavailable(
                "token verification is not configured on this instance",
            ));
        };
        let header =
            match parts.headers.get(header::AUTHORIZATION) {
                None => None,
                Some(v) => Some(v.to_str().map_err(|_| {
                    Problem::unauthorized("the bearer token is not a well-formed JWT")
                })?),
            };
        let claims = verifier.verify_header(header).map_err(|rejection| {
            super::metrics::auth_failure();
            Problem::unauthorized(rejection.detail())
        })?;
        Ok(Identity {
            // verify() checked that sub is a positive id.
            user_id: claims.user_id().unwrap_or_default(),
            username: claims.username.clone(),
        })
    }
}
