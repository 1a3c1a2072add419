//! Who is calling: the `Authorization: Bearer` RS256 token, verified here.
//!
//! The gateway already verified the token, but the api checks it again
//! (defence in depth): an api instance reachable without the gateway, or a
//! gateway route misconfigured as public, must not let anyone act as another
//! user. The rules mirror the gateway's verifier (`gateway/src/jwt.rs`):
//! the header is decoded by hand first so `alg` must be exactly `RS256` and
//! `kid` must name a configured public key; then `jsonwebtoken` checks the
//! signature, `exp`/`nbf` (leeway capped at 5 s), `iss` and `aud`, and `sub`
//! must be a positive user id. The `X-User-Id` header the gateway adds is
//! ignored entirely: only a verified token establishes identity.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use seckill_contracts::claims::AccessClaims;
use seckill_contracts::config::JwtConfig;

use super::problem::Problem;
use super::ApiState;

/// The contract's maximum clock skew on `exp`/`nbf`.
pub const MAX_LEEWAY_SECS: u64 = 5;

/// Longest token looked at; ours are a few hundred bytes.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Claims every token must carry.
const REQUIRED_CLAIMS: [&str; 6] = ["exp", "nbf", "iss", "aud", "sub", "iat"];

/// Why the verifier could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    #[error("jwt: no public keys configured")]
    NoKeys,
    #[error("jwt: reading public key {kid:?} from {path}: {source}")]
    Read {
        kid: String,
        path: String,
        source: std::io::Error,
    },
    #[error("jwt: public key {kid:?} at {path} is not an RSA public key PEM: {source}")]
    Key {
        kid: String,
        path: String,
        source: jsonwebtoken::errors::Error,
    },
}

/// Verifies access tokens with the configured public keys only.
pub struct TokenVerifier {
    keys: HashMap<String, DecodingKey>,
    validation: Validation,
    issuer: String,
    audience: String,
    leeway_secs: u64,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// Reads every `jwt.public_keys` PEM now, so requests never touch the
    /// filesystem; errors name the kid and path.
    pub fn from_config(config: &JwtConfig) -> Result<TokenVerifier, VerifierError> {
        let mut pems = Vec::with_capacity(config.public_keys.len());
        for key in &config.public_keys {
            let path = key.path.display().to_string();
            let pem = std::fs::read(&key.path).map_err(|source| VerifierError::Read {
                kid: key.kid.clone(),
                path: path.clone(),
                source,
            })?;
            pems.push((key.kid.clone(), path, pem));
        }
        Self::build(pems, config)
    }

    /// For embedding and tests: keys given as `(kid, PEM)` pairs.
    pub fn from_pems(
        pems: &[(String, Vec<u8>)],
        config: &JwtConfig,
    ) -> Result<TokenVerifier, VerifierError> {
        let pems = pems
            .iter()
            .map(|(kid, pem)| (kid.clone(), "(in memory)".to_string(), pem.clone()))
            .collect();
        Self::build(pems, config)
    }

    fn build(
        pems: Vec<(String, String, Vec<u8>)>,
        config: &JwtConfig,
    ) -> Result<TokenVerifier, VerifierError> {
        if pems.is_empty() {
            return Err(VerifierError::NoKeys);
        }
        let mut keys = HashMap::new();
        for (kid, path, pem) in pems {
            let key = DecodingKey::from_rsa_pem(&pem).map_err(|source| VerifierError::Key {
                kid: kid.clone(),
                path,
                source,
            })?;
            keys.insert(kid, key);
        }
        let leeway_secs = config.leeway_secs.min(MAX_LEEWAY_SECS);
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.set_issuer(&[config.issuer.as_str()]);
        validation.set_audience(&[config.audience.as_str()]);
        Ok(TokenVerifier {
            keys,
            validation,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            leeway_secs,
        })
    }

    /// Verifies an `Authorization` header value; the error is the 401
    /// detail. `Bearer` is matched case-insensitively (RFC 7235).
    pub fn verify_header(&self, authorization: Option<&str>) -> Result<AccessClaims, &'static str> {
        let value = authorization
            .ok_or("a bearer token is required in the Authorization header")?
            .trim();
        let (scheme, rest) = value.split_once([' ', '\t']).unwrap_or((value, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err("a bearer token is required in the Authorization header");
        }
        self.verify(rest.trim_matches([' ', '\t']))
    }

    /// Verifies a raw compact JWS.
    pub fn verify(&self, token: &str) -> Result<AccessClaims, &'static str> {
        const MALFORMED: &str = "the bearer token is not a well-formed JWT";
        if token.is_empty()
            || token.len() > MAX_TOKEN_BYTES
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            || token.split('.').count() != 3
        {
            return Err(MALFORMED);
        }
        let header = token.split('.').next().unwrap_or_default();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|_| MALFORMED)?;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&bytes).map_err(|_| MALFORMED)?;
        if header.get("alg").and_then(|a| a.as_str()) != Some("RS256") {
            return Err("the token must be signed with RS256");
        }
        if header.contains_key("crit") {
            return Err(MALFORMED);
        }
        let kid = header
            .get("kid")
            .and_then(|k| k.as_str())
            .ok_or("the token is not signed with a known key")?;
        let key = self
            .keys
            .get(kid)
            .ok_or("the token is not signed with a known key")?;
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            key,
            &self.validation,
        )
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => "the token has expired",
            ErrorKind::ImmatureSignature => "the token is not valid yet",
            ErrorKind::InvalidIssuer => "the token was issued by an unexpected issuer",
            ErrorKind::InvalidAudience => "the token is not meant for this service",
            ErrorKind::MissingRequiredClaim(_) => "the token lacks a required claim",
            ErrorKind::InvalidSignature => "the token signature is invalid",
            ErrorKind::InvalidAlgorithm
            | ErrorKind::MissingAlgorithm
            | ErrorKind::UnsupportedAlgorithm
            | ErrorKind::InvalidAlgorithmName => "the token must be signed with RS256",
            _ => MALFORMED,
        })?;
        let raw = data.claims;
        if REQUIRED_CLAIMS.iter().any(|c| !raw.contains_key(*c)) {
            return Err("the token lacks a required claim");
        }
        let claims: AccessClaims =
            serde_json::from_value(serde_json::Value::Object(raw)).map_err(|_| MALFORMED)?;
        // Exact equality, whatever the library tolerates (an `aud` array).
        if claims.iss != self.issuer {
            return Err("the token was issued by an unexpected issuer");
        }
        if claims.aud != self.audience {
            return Err("the token is not meant for this service");
        }
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        if claims.exp.saturating_add(self.leeway_secs) < now {
            return Err("the token has expired");
        }
        if claims.nbf > now.saturating_add(self.leeway_secs) {
            return Err("the token is not valid yet");
        }
        if claims.user_id().is_none() {
            return Err("the token subject is not a valid user id");
        }
        Ok(claims)
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
        let claims = verifier.verify_header(header).map_err(|detail| {
            super::metrics::auth_failure();
            Problem::unauthorized(detail)
        })?;
        Ok(Identity {
            // verify() checked that sub is a positive id.
            user_id: claims.user_id().unwrap_or_default(),
            username: claims.username,
        })
    }
}

/// Shared handle type kept in the state.
pub type SharedVerifier = Arc<TokenVerifier>;
