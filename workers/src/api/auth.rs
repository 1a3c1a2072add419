//! Registration and login: argon2id password hashes, RS256 access tokens.
//!
//! Passwords are hashed with argon2id (the argon2 crate's defaults, the
//! OWASP-recommended 19 MiB / 2 passes) through [`super::cpu_work`], on the
//! blocking pool because a hash takes tens of milliseconds of CPU and must
//! not stall the async workers, and at most `api.cpu_jobs` at once so a
//! login burst queues instead of taking every core and 19 MiB per request. Registration relies on the `UNIQUE(username)` index to detect a
//! taken name: a pre-check would race with a concurrent registration.
//! Login answers the same 401 for an unknown user and a wrong password, and
//! verifies against a dummy hash when the user is unknown so both take about
//! as long: neither the body nor the timing tells which usernames exist.

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, SaltString};
use argon2::{Argon2, PasswordVerifier};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::problem::{ApiJson, Problem, ProblemBody};
use super::ApiState;

/// Username rule: 3 to 32 of `[A-Za-z0-9_]`. Narrow on purpose: names show
/// up in logs and tokens, and nothing else is needed.
pub fn valid_username(name: &str) -> bool {
    (3..=32).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Password rule: 8 to 128 characters (the upper bound caps hashing cost).
pub fn valid_password(password: &str) -> bool {
    (8..=128).contains(&password.chars().count())
}

/// Hashes a password with argon2id and a random salt (PHC string).
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// True when `password` matches the PHC `hash`; false for a bad hash too.
pub fn verify_password(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Credentials of both routes.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// 3 to 32 of letters, digits and `_`.
    #[schema(
        min_length = 3,
        max_length = 32,
        pattern = "^[A-Za-z0-9_]+$",
        example = "alice_01"
    )]
    pub username: String,
    /// 8 to 128 characters.
    #[schema(min_length = 8, max_length = 128, example = "correct horse battery")]
    pub password: String,
}

/// The new account.
#[derive(Debug, Serialize, ToSchema)]
pub struct Registered {
    pub user_id: u64,
}

/// An access token and who it is for.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoggedIn {
    /// An RS256 JWT for `Authorization: Bearer`.
    pub access_token: String,
    /// Always `Bearer`.
    #[schema(value_type = String, example = "Bearer")]
    pub token_type: &'static str,
    /// Seconds until the token expires.
    pub expires_in: u64,
    pub user_id: u64,
}

/// `/api/v1/auth/*`.
pub fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(login))
}

/// Create an account.
#[utoipa::path(
    post,
    path = "/api/v1/auth/register",
    tag = "auth",
    operation_id = "register",
    request_body = Credentials,
    responses(
        (status = 201, description = "The account exists", body = Registered),
        (status = 409, description = "The username is taken", body = ProblemBody),
    ),
)]
async fn register(
    State(state): State<ApiState>,
    ApiJson(creds): ApiJson<Credentials>,
) -> Result<(StatusCode, Json<Registered>), Problem> {
    if !valid_username(&creds.username) {
        return Err(Problem::bad_request(
            "username must be 3 to 32 characters of letters, digits and '_'",
        ));
    }
    if !valid_password(&creds.password) {
        return Err(Problem::bad_request("password must be 8 to 128 characters"));
    }
    let password = creds.password;
    let hash = state
        .cpu()
        .run(move || hash_password(&password))
        .await
        .map_err(Problem::internal)?
        .map_err(Problem::internal)?;
    let result = sqlx::query("INSERT INTO users (username, password_hash) VALUES (?, ?)")
        .bind(&creds.username)
        .bind(&hash)
        .execute(state.db())
        .await;
    match result {
        Ok(done) => Ok((
            StatusCode::CREATED,
            Json(Registered {
                user_id: done.last_insert_id(),
            }),
        )),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(Problem::conflict(
            "/problems/username-taken",
            "that username is taken",
        )),
        Err(e) => Err(Problem::internal(e)),
    }
}

/// Exchange a username and password for an access token.
#[utoipa::path(
    post,
    path = "/api/v1/auth/login",
    tag = "auth",
    operation_id = "login",
    request_body = Credentials,
    responses(
        (status = 200, description = "A token for the other routes", body = LoggedIn),
        (status = 401, description = "Unknown username or wrong password (the same answer for both)", body = ProblemBody),
    ),
)]
async fn login(
    State(state): State<ApiState>,
    ApiJson(creds): ApiJson<Credentials>,
) -> Result<Json<LoggedIn>, Problem> {
    const WRONG: &str = "unknown username or wrong password";
    let Some(signer) = state.signer() else {
        return Err(Problem::unavailable(
            "token signing is not configured on this instance",
        ));
    };
    // Invalid shapes cannot belong to an account; answer like a wrong
    // password without touching the database (still after a hash, below).
    let row: Option<(u64, String)> =
        if valid_username(&creds.username) && valid_password(&creds.password) {
            sqlx::query_as("SELECT id, password_hash FROM users WHERE username = ?")
                .bind(&creds.username)
                .fetch_optional(state.db())
                .await
                .map_err(Problem::internal)?
        } else {
            None
        };
    let (user_id, hash, known) = match row {
        Some((id, hash)) => (id, hash, true),
        None => (0, state.dummy_hash().to_string(), false),
    };
    // Bound the work an attacker can cause with a huge password.
    let password: String = creds.password.chars().take(128).collect();
    let ok = state
        .cpu()
        .run(move || verify_password(&password, &hash))
        .await
        .map_err(Problem::internal)?;
    if !(ok && known) {
        return Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "/problems/invalid-credentials",
            WRONG,
        ));
    }
    let access_token = signer
        .issue(user_id, &creds.username)
        .map_err(Problem::internal)?;
    Ok(Json(LoggedIn {
        access_token,
        token_type: "Bearer",
        expires_in: signer.ttl_secs(),
        user_id,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_rules() {
        assert!(valid_username("alice_01"));
        for bad in ["ab", "a'; DROP TABLE users;--", "ünï", &"a".repeat(33), ""] {
            assert!(!valid_username(bad), "{bad}");
        }
        assert!(valid_password("12345678"));
        assert!(!valid_password("1234567"));
        assert!(!valid_password(&"x".repeat(129)));
    }
}
