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

use seckill_contracts::jwt::JwtVerifier;

use super::problem::Problem;
use super::ApiState;

/// A service state that can verify bearer tokens: the api's, and the
/// wallet's (which serves `GET /api/v1/wallet` the same way).
pub trait VerifiesTokens {
    /// The verifier, when the public keys loaded.
    fn token_verifier(&self) -> Option<&JwtVerifier>;
}

impl VerifiesTokens for ApiState {
    fn token_verifier(&self) -> Option<&JwtVerifier> {
        self.verifier()
    }
}

/// The verified caller of an authenticated route. Extracting it is the
/// route's authentication: a handler taking `Identity` can only run for a
/// valid token.
#[derive(Debug, Clone)]
pub struct Identity {
    /// From the verified `sub`; never from `X-User-Id`.
    pub user_id: u64,
    pub username: String,
}

impl<S: VerifiesTokens + Send + Sync> FromRequestParts<S> for Identity {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let Some(verifier) = state.token_verifier() else {
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
