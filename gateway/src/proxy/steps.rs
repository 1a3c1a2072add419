//! The edge's request filter as an ordered list of named steps. Each step
//! lets the request go on or returns the [`Answer`] the gateway writes
//! itself; a new edge check is a new step with its own unit test.
//!
//! ```text
//! refuse_malformed   header size (431), CL/TE smuggling (400), declared
//!                    body too large (413): answered, connection closed
//! strip_untrusted    a client's X-User-Id never reaches anything
//! health             GET/HEAD /healthz answered here
//! route              404; a chunked body on a proxied route is 411
//! authenticate       the JWT, unless the route is public (401)
//! web_file           a `files` route: the file from memory (200, 304, 404)
//! shortcut           an answer a rule stored, replayed without Lua
//! local_body         a local route's JSON body (413, 400)
//! rules              the Lua `access` phase: answer, or go on to the pool
//!                    (skipped for routes `main.lua` does not list)
//! micro_cache        a cached route's page from the edge, or this request
//!                    fetches it for the others
//! ```
//!
//! Every step that needs no socket works on the request header alone, so
//! its tests build a header and call it.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use seckill_contracts::claims::AccessClaims;

use crate::jwt::JwtRejection;
use crate::key_refresh::KeyRefresher;
use crate::metrics;
use crate::micro_cache::{Lookup, MicroCache, Page};
use crate::problem::LocalResponse;
use crate::routes::{Resolved, RouteTable};
use crate::rules::{Decision, RequestInfo, RuleSet};
use crate::web_files::WebFiles;

use super::{RequestCtx, RequestLimits};

/// Headers a client must never be able to set for the upstream.
pub(super) const UNTRUSTED_HEADERS: [&str; 1] = ["x-user-id"];

/// What the gateway answers itself instead of proxying.
#[derive(Debug)]
pub struct Answer {
    reply: Reply,
    /// The request's body (if any) was not read: close the connection
    /// rather than parse the rest as a next request.
    close: bool,
}

#[derive(Debug)]
enum Reply {
    Own(LocalResponse),
    /// A rule shortcut, shared by every request it answers.
    Shared(Arc<LocalResponse>),
    /// A micro-cached page; `stale` while another request refreshes it.
    Cached {
        page: Arc<Page>,
        stale: bool,
    },
}

impl Answer {
    fn new(response: LocalResponse) -> Answer {
        Answer {
            reply: Reply::Own(response),
            close: false,
        }
    }

    fn closing(response: LocalResponse) -> Answer {
        Answer {
            reply: Reply::Own(response),
            close: true,
        }
    }

    #[cfg(test)]
    fn status(&self) -> u16 {
        match &self.reply {
            Reply::Own(r) => r.status,
            Reply::Shared(r) => r.status,
            Reply::Cached { .. } => 200,
        }
    }

    #[cfg(test)]
    fn body(&self) -> &[u8] {
        match &self.reply {
            Reply::Own(r) => &r.body,
            Reply::Shared(r) => &r.body,
            Reply::Cached { .. } => &[],
        }
    }

    /// Writes the one answer this request gets.
    pub async fn write(self, session: &mut Session, request_id: &str) -> pingora::Result<()> {
        if self.close {
            session.set_keepalive(None);
        }
        match self.reply {
            Reply::Own(r) => r.write(session, request_id).await,
            Reply::Shared(r) => r.write_ref(session, request_id).await,
            Reply::Cached { page, stale } => page.write(session, request_id, stale).await,
        }
    }
}

/// Where the request goes after the steps.
#[derive(Debug)]
pub enum Flow {
    Answer(Answer),
    Proxy,
}

/// Ambiguous framing or oversized headers and declared bodies are refused
/// before anything else looks at the request (and logged once, here).
pub(super) fn refuse_malformed(
    req: &RequestHeader,
    limits: &RequestLimits,
    request_id: &str,
) -> Option<Answer> {
    let (status, detail) = if header_bytes(req) > limits.max_header_bytes {
        (431, "request headers too large")
    } else if let Some(why) = framing_problem(req) {
        (400, why)
    } else if declared_length(req).is_some_and(|n| n > limits.max_body_bytes as u64) {
        (413, "request body too large")
    } else {
        return None;
    };
    tracing::warn!(request_id, status, detail, "request refused");
    Some(Answer::closing(LocalResponse::problem(status, detail)))
}

/// Removes what a client must not set (the upstream gets the verified id).
pub(super) fn strip_untrusted(req: &mut RequestHeader) {
    for h in UNTRUSTED_HEADERS {
        req.remove_header(h);
    }
}

/// `/healthz` for load balancers and keepalived: answered by the gateway.
/// `broker` is asked only for `/healthz` itself: reading the publisher's
/// link (and setting its gauge) showed up in every request's profile when
/// it was read up front.
pub(super) fn health(req: &RequestHeader, broker: impl FnOnce() -> &'static str) -> Option<Answer> {
    let local = req.uri.path() == "/healthz"
        && (req.method == http::Method::GET || req.method == http::Method::HEAD);
    local.then(|| {
        Answer::new(LocalResponse::json(
            200,
            &serde_json::json!({"status": "ok", "broker": broker()}),
        ))
    })
}

/// Matches the route and records it (name, pool, params) in `ctx`.
pub(super) fn route(
    routes: &RouteTable,
    pools: &crate::pools::Pools,
    req: &RequestHeader,
    ctx: &mut RequestCtx,
) -> Option<Answer> {
    let matched = match routes.resolve(req.method.as_str(), req.uri.path()) {
        Resolved::Route(m) => m,
        Resolved::NotFound => {
            return Some(Answer::new(LocalResponse::problem(
                404,
                "no route for this path",
            )))
        }
        Resolved::MethodNotAllowed(allowed) => {
            return Some(Answer::new(
                LocalResponse::problem(405, "this route does not accept that method")
                    .with_header("allow", allowed.join(", ")),
            ))
        }
    };
    ctx.route = matched.route.name.clone();
    ctx.public = matched.route.public;
    ctx.files = matched.route.files;
    ctx.cache_ms = matched.route.cache_ms;
    ctx.pool = matched
        .route
        .pool
        .as_ref()
        .and_then(|p| pools.get(p))
        .cloned();
    ctx.params = matched.params;
    if ctx.pool.is_some() && req.headers.contains_key(http::header::TRANSFER_ENCODING) {
        // A streamed body could pass its first chunks upstream before the
        // size limit trips; proxied routes take declared lengths only.
        return Some(Answer::closing(LocalResponse::problem(
            411,
            "a request body needs a Content-Length",
        )));
    }
    None
}

/// The JWT check of a non-public route: the verified claims, or the 401.
/// A token naming a kid we lack waits for a key refresh that ends after it
/// came (rate-limited, see `key_refresh`) and is checked again, so a freshly
/// rotated key is accepted on its first request.
pub(super) async fn authenticate(
    keys: &KeyRefresher,
    req: &RequestHeader,
    public: bool,
) -> Result<Option<Arc<AccessClaims>>, Answer> {
    if public {
        return Ok(None);
    }
    let auth = req
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let jwt = keys.verifier();
    let mut verdict = jwt.verify_header(auth);
    if verdict == Err(JwtRejection::UnknownKey) && keys.enabled() {
        keys.on_unknown_kid().await;
        verdict = jwt.verify_header(auth);
    }
    match verdict {
        Ok(claims) => Ok(Some(claims)),
        Err(rejection) => {
            metrics::JWT_FAILURES
                .with_label_values(&[rejection.reason()])
                .inc();
            let challenge = if auth.is_none() {
                "Bearer".to_string()
            } else {
                format!(
                    "Bearer error=\"invalid_token\", error_description=\"{}\"",
                    rejection.detail()
                )
            };
            Err(Answer::new(
                LocalResponse::problem(401, rejection.detail())
                    .with_header("www-authenticate", challenge),
            ))
        }
    }
}

/// A `files` route's answer: the file the path names, from memory.
pub(super) fn web_file(web: &WebFiles, req: &RequestHeader) -> Answer {
    let header = |name| req.headers.get(name).and_then(|v| v.to_str().ok());
    Answer::new(web.answer(
        req.uri.path(),
        header(http::header::IF_NONE_MATCH),
        header(http::header::ACCEPT_ENCODING),
    ))
}

/// An answer a rule of this version stored for this route and params.
pub(super) fn shortcut(rules: &RuleSet, ctx: &RequestCtx) -> Option<Answer> {
    let answer = rules.shortcut(&ctx.route, &ctx.params)?;
    metrics::RULE_SHORTCUTS
        .with_label_values(&[ctx.route.as_str()])
        .inc();
    Some(Answer {
        reply: Reply::Shared(answer),
        close: false,
    })
}

/// A local route's body, read whole (within the limit) and parsed as JSON.
/// Proxied routes stream theirs to the upstream instead.
pub(super) async fn local_body(
    session: &mut Session,
    limits: &RequestLimits,
    ctx: &RequestCtx,
) -> pingora::Result<Result<Option<serde_json::Value>, Answer>> {
    if ctx.pool.is_some() || session.is_body_empty() {
        return Ok(Ok(None));
    }
    let Some(bytes) = read_capped(session, limits.max_body_bytes).await? else {
        return Ok(Err(Answer::closing(LocalResponse::problem(
            413,
            "request body too large",
        ))));
    };
    Ok(parse_json_body(&bytes))
}

async fn read_capped(session: &mut Session, max: usize) -> pingora::Result<Option<Bytes>> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = session.read_request_body().await? {
        if buf.len() + chunk.len() > max {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Some(buf.freeze()))
}

fn parse_json_body(bytes: &[u8]) -> Result<Option<serde_json::Value>, Answer> {
    if bytes.is_empty() {
        return Ok(None);
    }
    serde_json::from_slice(bytes).map(Some).map_err(|e| {
        Answer::new(LocalResponse::problem(
            400,
            format!("malformed JSON body: {e}"),
        ))
    })
}

/// The request as the rules see it.
pub(super) fn request_info(
    session: &Session,
    ctx: &RequestCtx,
    body: Option<serde_json::Value>,
) -> RequestInfo {
    let req = session.req_header();
    let headers = req
        .headers
        .iter()
        .filter(|(k, _)| *k != http::header::AUTHORIZATION)
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    RequestInfo {
        request_id: ctx.request_id.clone(),
        method: req.method.as_str().to_string(),
        path: req.uri.path().to_string(),
        query: req.uri.query().unwrap_or("").to_string(),
        route: ctx.route.clone(),
        params: ctx.params.clone(),
        headers,
        client_ip: client_ip(session),
        body,
        claims: ctx.claims.clone(),
    }
}

/// A route the rules declared no interest in: on to its pool, or, for a
/// local route (which only rules can answer), the same 500 as rules that
/// did not answer.
pub(super) fn without_rules(ctx: &RequestCtx) -> Flow {
    if ctx.pool.is_some() {
        return Flow::Proxy;
    }
    tracing::error!(request_id = %ctx.request_id, route = %ctx.route, "local route: the rules do not handle it");
    Flow::Answer(Answer::new(LocalResponse::problem(
        500,
        "the rules did not answer this request",
    )))
}

/// The Lua `access` phase's decision as the request's flow.
pub(super) async fn rules(rules: &RuleSet, info: &RequestInfo, ctx: &RequestCtx) -> Flow {
    match rules.access(info).await {
        Ok(Decision::Respond(resp)) => Flow::Answer(Answer::new(resp)),
        Ok(Decision::Continue) if ctx.pool.is_some() => Flow::Proxy,
        Ok(Decision::Continue) => {
            tracing::error!(request_id = %ctx.request_id, route = %ctx.route, "local route: rules did not answer");
            Flow::Answer(Answer::new(LocalResponse::problem(
                500,
                "the rules did not answer this request",
            )))
        }
        Err(e) => {
            tracing::error!(request_id = %ctx.request_id, route = %ctx.route, error = %e, "rule error");
            Flow::Answer(Answer::new(LocalResponse::problem(
                500,
                "rule error; see the gateway log for this request id",
            )))
        }
    }
}

/// A cached route's page (see [`crate::micro_cache`]): answered from the
/// edge, or this request goes upstream as the page's one fetch. A request
/// that finds another's fetch under way waits for it (at most
/// `micro_cache.wait_ms`), then takes the page or goes upstream itself.
pub(super) async fn micro_cache(
    cache: &Arc<MicroCache>,
    req: &RequestHeader,
    ctx: &mut RequestCtx,
) -> Option<Answer> {
    if ctx.cache_ms == 0 || req.method != http::Method::GET {
        return None;
    }
    let key = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let fresh = Duration::from_millis(ctx.cache_ms);
    let mut lookup = cache.lookup(key, fresh);
    if let Lookup::Wait(mut fetch) = lookup {
        let _ = tokio::time::timeout(cache.wait_limit(), fetch.changed()).await;
        lookup = match cache.lookup(key, fresh) {
            Lookup::Wait(_) => Lookup::Bypass,
            other => other,
        };
    }
    match lookup {
        Lookup::Hit { page, stale } => Some(Answer {
            reply: Reply::Cached { page, stale },
            close: false,
        }),
        Lookup::Fill(fill) => {
            ctx.cache_fill = Some(fill);
            None
        }
        Lookup::Bypass | Lookup::Wait(_) => None,
    }
}

/// The client's IP from the socket (never from `X-Forwarded-For`).
pub(super) fn client_ip(session: &Session) -> String {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_string())
        .unwrap_or_default()
}

fn header_bytes(req: &RequestHeader) -> usize {
    // The request target as sent (path and query; an absolute-form
    // target's scheme and authority too), measured without rendering it.
    let target = req.uri.path_and_query().map_or(1, |pq| pq.as_str().len())
        + req.uri.scheme_str().map_or(0, |s| s.len() + 3)
        + req.uri.authority().map_or(0, |a| a.as_str().len());
    let line = req.method.as_str().len() + target + 12;
    req.headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + line
}

/// The body-framing checks that stop request smuggling: both framings at
/// once, or several disagreeing lengths, are refused.
fn framing_problem(req: &RequestHeader) -> Option<&'static str> {
    let te = req
        .headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .count();
    let cls: Vec<_> = req
        .headers
        .get_all(http::header::CONTENT_LENGTH)
        .iter()
        .collect();
    if te > 0 && !cls.is_empty() {
        return Some("both Content-Length and Transfer-Encoding");
    }
    if cls.len() > 1 && cls.windows(2).any(|w| w[0] != w[1]) {
        return Some("conflicting Content-Length headers");
    }
    if let Some(cl) = cls.first() {
        if cl
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_none()
        {
            return Some("invalid Content-Length");
        }
    }
    None
}

fn declared_length(req: &RequestHeader) -> Option<u64> {
    req.headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits = RequestLimits {
        max_header_bytes: 1024,
        max_body_bytes: 100,
    };

    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build(method, path.as_bytes(), None).unwrap();
        for (k, v) in headers {
            req.append_header(k.to_string(), *v).unwrap();
        }
        req
    }

    fn refused(headers: &[(&str, &str)]) -> Option<u16> {
        refuse_malformed(&request("POST", "/x", headers), &LIMITS, "rid").map(|a| a.status())
    }

    #[test]
    fn malformed_requests_are_refused_and_closed() {
        assert_eq!(refused(&[]), None);
        assert_eq!(refused(&[("content-length", "100")]), None);
        assert_eq!(refused(&[("content-length", "101")]), Some(413));
        assert_eq!(
            refused(&[("content-length", "5"), ("transfer-encoding", "chunked")]),
            Some(400)
        );
        assert_eq!(
            refused(&[("content-length", "5"), ("content-length", "6")]),
            Some(400)
        );
        assert_eq!(refused(&[("content-length", "five")]), Some(400));
        let big = "x".repeat(2_000);
        assert_eq!(refused(&[("x-big", big.as_str())]), Some(431));
        let answer =
            refuse_malformed(&request("GET", "/", &[("x-big", &big)]), &LIMITS, "r").unwrap();
        assert!(
            answer.close,
            "the unread rest must not be parsed as a request"
        );
    }

    #[test]
    fn untrusted_headers_never_pass() {
        let mut req = request("GET", "/", &[("x-user-id", "1"), ("X-User-Id", "2")]);
        strip_untrusted(&mut req);
        assert!(req.headers.get("x-user-id").is_none());
    }

    #[test]
    fn health_is_local_for_get_and_head_only() {
        let connected = || "connected";
        assert!(health(&request("GET", "/healthz", &[]), connected).is_some());
        assert!(health(&request("HEAD", "/healthz", &[]), connected).is_some());
        assert!(health(&request("POST", "/healthz", &[]), connected).is_none());
        assert!(health(&request("GET", "/healthz/x", &[]), connected).is_none());
    }

    #[test]
    fn only_healthz_reads_the_broker_state() {
        let asked = std::cell::Cell::new(0);
        let broker = || {
            asked.set(asked.get() + 1);
            "reconnecting"
        };
        for (method, path) in [("POST", "/api/v1/seckill/p/1"), ("GET", "/api/v1/sales")] {
            assert!(health(&request(method, path, &[]), broker).is_none());
        }
        assert_eq!(
            asked.get(),
            0,
            "a request that is not /healthz read the broker state"
        );
        let answer = health(&request("GET", "/healthz", &[]), broker).expect("/healthz is local");
        assert_eq!(asked.get(), 1);
        assert!(String::from_utf8_lossy(answer.body()).contains("\"broker\":\"reconnecting\""));
    }

    #[test]
    fn json_bodies_parse_or_are_a_400() {
        assert!(matches!(parse_json_body(b""), Ok(None)));
        assert!(matches!(parse_json_body(br#"{"a":1}"#), Ok(Some(_))));
        let err = parse_json_body(b"{nope").unwrap_err();
        assert_eq!(err.status(), 400);
    }
}
