//! RFC 9457 problem details: the one shape every error of the api takes.
//!
//! SPEC §3 makes `application/problem+json` with `type`, `title`, `status`
//! and `detail` the error contract, so clients (and the gateway, which passes
//! bodies through) can handle every failure the same way. Handlers return
//! `Result<_, Problem>`; axum's own extractor rejections (bad JSON, wrong
//! content type, body too large, bad path) are converted by the wrapper
//! extractors here ([`ApiJson`]) and by the router fallbacks, so no plain-text
//! error ever leaves the service. Internal errors are logged with their cause
//! and answered with a generic 500 detail: store errors can carry SQL or
//! addresses that a client must not see.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The media type of every error body.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// One error answer. Build it with the constructors, add headers with
/// [`Problem::with_header`], and return it from a handler.
#[derive(Debug, Clone)]
pub struct Problem {
    status: StatusCode,
    /// A URI reference naming the problem kind; `about:blank`-style relative
    /// names under `/problems/` keep them stable for clients to match on.
    kind: &'static str,
    title: String,
    detail: String,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// An error answer, `application/problem+json` (RFC 9457).
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Problem)]
pub struct ProblemBody<'a> {
    /// Names the kind of problem (e.g. `/problems/sold-out`); stable, for
    /// clients to match on.
    #[serde(rename = "type")]
    #[schema(rename = "type", example = "/problems/not-found")]
    kind: &'a str,
    /// The status's reason phrase.
    #[schema(example = "Not Found")]
    title: &'a str,
    /// The HTTP status, repeated.
    #[schema(example = 404)]
    status: u16,
    /// What happened and what to do, in words a buyer can read.
    #[schema(example = "no such sale")]
    detail: &'a str,
}

impl Problem {
    /// A problem with an explicit status, kind slug and detail; the title is
    /// the status's canonical reason phrase.
    pub fn new(status: StatusCode, kind: &'static str, detail: impl Into<String>) -> Problem {
        Problem {
            status,
            kind,
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            detail: detail.into(),
            headers: Vec::new(),
        }
    }

    /// 400: the request is malformed or fails validation; nothing changed.
    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, "/problems/invalid-request", detail)
    }

    /// 401 with `WWW-Authenticate: Bearer` (RFC 6750), as SPEC §3 requires
    /// for every missing or invalid token.
    pub fn unauthorized(detail: impl Into<String>) -> Problem {
        let detail = detail.into();
        // The description goes into a quoted header parameter: keep it safe.
        let safe: String = detail
            .chars()
            .filter(|c| c.is_ascii() && !c.is_ascii_control() && *c != '"' && *c != '\\')
            .collect();
        let value = format!("Bearer error=\"invalid_token\", error_description=\"{safe}\"");
        Problem::new(StatusCode::UNAUTHORIZED, "/problems/unauthorized", detail).with_header(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("Bearer")),
        )
    }

    /// 404: the resource does not exist (or is not the caller's to see).
    pub fn not_found(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, "/problems/not-found", detail)
    }

    /// 409: the request conflicts with the resource's current state.
    pub fn conflict(kind: &'static str, detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::CONFLICT, kind, detail)
    }

    /// 503: a dependency this route needs is not configured or reachable.
    pub fn unavailable(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "/problems/unavailable",
            detail,
        )
    }

    /// 500 for an unexpected failure: the cause is logged here, the client
    /// gets a generic sentence (store errors can leak internals).
    pub fn internal(cause: impl std::fmt::Display) -> Problem {
        tracing::error!(error = %cause, "internal error");
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "/problems/internal",
            "an internal error occurred; try again later",
        )
    }

    /// Adds a response header (e.g. `WWW-Authenticate`, `Retry-After`).
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Problem {
        self.headers.push((name, value));
        self
    }

    /// The HTTP status of this problem.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The human-readable explanation.
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = ProblemBody {
            kind: self.kind,
            title: &self.title,
            status: self.status.as_u16(),
            detail: &self.detail,
        };
        // Plain strings and integers always serialise.
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
            )],
            bytes,
        )
            .into_response();
        for (name, value) in self.headers {
            response.headers_mut().append(name, value);
        }
        response
    }
}

impl From<JsonRejection> for Problem {
    fn from(rejection: JsonRejection) -> Problem {
        let status = rejection.status();
        let kind = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "/problems/body-too-large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "/problems/unsupported-media-type",
            _ => "/problems/invalid-request",
        };
        // 422 (valid JSON, wrong shape) is reported as 400: SPEC §3 names
        // 400 for every invalid input.
        let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
            StatusCode::BAD_REQUEST
        } else {
            status
        };
        Problem::new(status, kind, rejection.body_text())
    }
}

/// `axum::Json` whose rejections are problem+json. Use it for every JSON
/// request body.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(Problem::from(rejection)),
        }
    }
}

/// Router fallback: unknown paths are problem+json 404s too.
pub async fn route_not_found() -> Problem {
    Problem::not_found("no such route")
}

/// Router fallback for a known path with the wrong method.
pub async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "/problems/method-not-allowed",
        "this route does not accept that method",
    )
}

/// The `{id}` of the sale routes, as the OpenAPI document describes it;
/// the handlers take it as text and parse it with [`parse_sale_id`].
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct SaleIdParam {
    /// The sale's id.
    #[param(minimum = 1, maximum = 9007199254740991.0)]
    id: u64,
}

/// The largest sale id: 2^53 − 1, the largest integer a JSON number (and
/// the gateway's Lua) carries exactly, so every client reads an id as
/// itself. `lua/seckill.lua` refuses larger ones the same way.
pub const MAX_SALE_ID: u64 = (1 << 53) - 1;

/// Parses a sale id path segment. Anything but a decimal in
/// 1..=[`MAX_SALE_ID`] names no sale, so it is a 404, never a 500 or a panic.
pub fn parse_sale_id(raw: &str) -> Result<u64, Problem> {
    if raw.is_empty() || raw.len() > 20 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Problem::not_found("no such sale"));
    }
    match raw.parse::<u64>() {
        Ok(id) if (1..=MAX_SALE_ID).contains(&id) => Ok(id),
        _ => Err(Problem::not_found("no such sale")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sale_ids_parse_strictly() {
        assert_eq!(parse_sale_id("42").unwrap(), 42);
        assert_eq!(parse_sale_id("9007199254740991").unwrap(), MAX_SALE_ID);
        for bad in [
            "9007199254740992",
            "",
            "0",
            "-1",
            "+1",
            "1e3",
            "abc",
            "99999999999999999999999",
            "18446744073709551616",
        ] {
            assert_eq!(
                parse_sale_id(bad).unwrap_err().status(),
                StatusCode::NOT_FOUND,
                "{bad}"
            );
        }
    }

    #[test]
    fn unauthorized_carries_bearer_challenge() {
        let r = Problem::unauthorized("bad \"token\"\n").into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let v = r.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
        assert!(v.starts_with("Bearer"), "{v}");
        assert_eq!(r.headers()[header::CONTENT_TYPE], PROBLEM_CONTENT_TYPE);
    }
}
