//! The edge's request lifecycle, hung on Pingora's `ProxyHttp` phases.
//!
//! ```text
//! early_request_filter  header-size limit (431), CL/TE smuggling guard (400),
//!                       declared body too large (413)
//! request_filter        /healthz; route (404); strip client X-User-Id;
//!                       JWT unless the route is public (401); small JSON body
//!                       for local routes (400/413); Lua `access` phase →
//!                       answer locally or go on to the pool
//! upstream_peer         a healthy backend of the route's pool
//! upstream_request      X-Forwarded-For appended, X-Request-Id, X-User-Id
//! request_body_filter   body bytes capped (413); proxied routes refuse
//!                       chunked bodies (411) so nothing partial goes upstream
//! fail_to_connect /     one retry on another backend, idempotent methods only
//! error_while_proxy
//! fail_to_proxy         what is left after the retry: a problem+json naming
//!                       the failure (502, 504 on a timeout, 503 no backend)
//! response_filter       X-Request-Id on the way out; Connection: close
//!                       while draining
//! logging               metrics, Lua `log` phase
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};
use seckill_contracts::claims::AccessClaims;

use crate::drain;
use crate::jwt::JwtVerifier;
use crate::metrics;
use crate::pools::{Pool, Pools};
use crate::problem::LocalResponse;
use crate::routes::RouteTable;
use crate::rules::{Decision, RequestInfo, RuleEngine, RuleSet};

/// Headers a client must never be able to set for the upstream.
const UNTRUSTED_HEADERS: [&str; 1] = ["x-user-id"];

/// Size limits on what a client may send.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
}

/// The proxy's shared state.
pub struct EdgeProxy {
    routes: RouteTable,
    pools: Pools,
    jwt: Arc<JwtVerifier>,
    rules: Arc<RuleEngine>,
    limits: RequestLimits,
}

/// Per-request state carried between phases.
pub struct RequestCtx {
    started: Instant,
    request_id: String,
    route: String,
    pool: Option<Arc<Pool>>,
    claims: Option<Arc<AccessClaims>>,
    /// The rule version this request started on; it finishes on it.
    rules: Option<Arc<RuleSet>>,
    info: Option<RequestInfo>,
    /// Backend of the previous attempt; a retry avoids it.
    last_backend: Option<SocketAddr>,
    attempts: u32,
    body_bytes: usize,
}

impl EdgeProxy {
    pub fn new(
        routes: RouteTable,
        pools: Pools,
        jwt: Arc<JwtVerifier>,
        rules: Arc<RuleEngine>,
        limits: RequestLimits,
    ) -> EdgeProxy {
        EdgeProxy {
            routes,
            pools,
            jwt,
            rules,
            limits,
        }
    }

    /// Idempotent methods may go to a second backend; a POST never does.
    fn may_retry(session: &Session, ctx: &RequestCtx) -> bool {
        ctx.attempts < 2 && session.req_header().method.is_idempotent()
    }

    /// Reads a local route's body, refusing more than the limit.
    async fn read_body(&self, session: &mut Session) -> Result<std::result::Result<Bytes, u16>> {
        let mut buf = BytesMut::new();
        while let Some(chunk) = session.read_request_body().await? {
            if buf.len() + chunk.len() > self.limits.max_body_bytes {
                return Ok(Err(413));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Ok(buf.freeze()))
    }
}

fn header_bytes(req: &RequestHeader) -> usize {
    let line = req.method.as_str().len() + req.uri.to_string().len() + 12;
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

/// The status for a request the proxy could not complete, as Pingora's
/// default answer would pick it, except that an upstream timeout is a 504
/// rather than a 502 so a buyer's client and the metrics can tell a slow
/// backend from a broken one. `None`: the client's own connection is gone,
/// there is nobody to answer.
fn failure_status(e: &Error) -> Option<u16> {
    use ErrorType::*;
    match (e.etype(), e.esource()) {
        (HTTPStatus(code), _) => Some(*code),
        (ConnectTimedout | ReadTimedout | WriteTimedout, ErrorSource::Upstream) => Some(504),
        (_, ErrorSource::Upstream) => Some(502),
        (WriteError | ReadError | ConnectionClosed, ErrorSource::Downstream) => None,
        (_, ErrorSource::Downstream) => Some(400),
        (_, ErrorSource::Internal | ErrorSource::Unset) => Some(500),
    }
}

/// The problem detail for [`failure_status`]: the gateway's own refusals
/// keep their explanation; an upstream failure names the pool and the kind
/// of failure (never a backend address) so the buyer's report, the gateway
/// log line with the same request id, and the metrics line up.
fn failure_detail(e: &Error, pool: Option<&str>, attempts: u32) -> String {
    match (e.etype(), e.esource()) {
        (ErrorType::HTTPStatus(_), _) => e
            .context
            .as_ref()
            .map(|c| c.as_str().to_string())
            .unwrap_or_else(|| "request refused".into()),
        (kind, ErrorSource::Upstream) => format!(
            "upstream pool `{}` failed: {} (attempts: {attempts})",
            pool.unwrap_or("?"),
            kind.as_str()
        ),
        (kind, _) => format!("the request could not be proxied: {}", kind.as_str()),
    }
}

fn declared_length(req: &RequestHeader) -> Option<u64> {
    req.headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            request_id: uuid::Uuid::now_v7().simple().to_string(),
            route: "unmatched".into(),
            pool: None,
            claims: None,
            rules: None,
            info: None,
            last_backend: None,
            attempts: 0,
            body_bytes: 0,
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let req = session.req_header();
        let refusal = if header_bytes(req) > self.limits.max_header_bytes {
            Some((431, "request headers too large"))
        } else if let Some(why) = framing_problem(req) {
            Some((400, why))
        } else if declared_length(req).is_some_and(|n| n > self.limits.max_body_bytes as u64) {
            Some((413, "request body too large"))
        } else {
            None
        };
        if let Some((status, detail)) = refusal {
            ctx.route = "refused".into();
            // The body (if any) is not read: close instead of reusing.
            session.set_keepalive(None);
            LocalResponse::problem(status, detail)
                .write(session, &ctx.request_id)
                .await?;
            return Err(Error::explain(ErrorType::HTTPStatus(status), detail));
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        for h in UNTRUSTED_HEADERS {
            session.req_header_mut().remove_header(h);
        }
        let (method, path, query) = {
            let req = session.req_header();
            (
                req.method.as_str().to_string(),
                req.uri.path().to_string(),
                req.uri.query().unwrap_or("").to_string(),
            )
        };
        if path == "/healthz" && (method == "GET" || method == "HEAD") {
            ctx.route = "healthz".into();
            LocalResponse::json(200, &serde_json::json!({"status": "ok"}))
                .write(session, &ctx.request_id)
                .await?;
            return Ok(true);
        }
        let Some(matched) = self.routes.find(&method, &path) else {
            LocalResponse::problem(404, "no route for this method and path")
                .write(session, &ctx.request_id)
                .await?;
            return Ok(true);
        };
        let route = matched.route;
        ctx.route = route.name.clone();
        ctx.pool = route.pool.as_ref().and_then(|p| self.pools.get(p)).cloned();
        if ctx.pool.is_some()
            && session
                .req_header()
                .headers
                .contains_key(http::header::TRANSFER_ENCODING)
        {
            // A streamed body could pass its first chunks upstream before the
            // size limit trips; proxied routes take declared lengths only.
            session.set_keepalive(None);
            LocalResponse::problem(411, "a request body needs a Content-Length")
                .write(session, &ctx.request_id)
                .await?;
            return Ok(true);
        }

        if !route.public {
            let auth = session
                .req_header()
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            match self.jwt.verify_header(auth) {
                Ok(claims) => ctx.claims = Some(claims),
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
                    LocalResponse::problem(401, rejection.detail())
                        .with_header("www-authenticate", challenge)
                        .write(session, &ctx.request_id)
                        .await?;
                    return Ok(true);
                }
            }
        }

        let rules = self.rules.current();
        if let Some(answer) = rules.shortcut(&route.name, &matched.params) {
            metrics::RULE_SHORTCUTS
                .with_label_values(&[route.name.as_str()])
                .inc();
            answer.write_ref(session, &ctx.request_id).await?;
            return Ok(true);
        }

        let mut body = None;
        if ctx.pool.is_none() && !session.is_body_empty() {
            let bytes = match self.read_body(session).await? {
                Ok(b) => b,
                Err(status) => {
                    session.set_keepalive(None);
                    LocalResponse::problem(status, "request body too large")
                        .write(session, &ctx.request_id)
                        .await?;
                    return Ok(true);
                }
            };
            if !bytes.is_empty() {
                match serde_json::from_slice::<serde_json::Value>(&bytes) {
                    Ok(v) => body = Some(v),
                    Err(e) => {
                        LocalResponse::problem(400, format!("malformed JSON body: {e}"))
                            .write(session, &ctx.request_id)
                            .await?;
                        return Ok(true);
                    }
                }
            }
        }

        let client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let headers = session
            .req_header()
            .headers
            .iter()
            .filter(|(k, _)| *k != http::header::AUTHORIZATION)
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        let info = RequestInfo {
            request_id: ctx.request_id.clone(),
            method,
            path,
            query,
            route: route.name.clone(),
            params: matched.params.clone(),
            headers,
            client_ip,
            body,
            claims: ctx.claims.clone(),
        };
        let decision = rules.access(&info).await;
        ctx.rules = Some(rules);
        ctx.info = Some(info);
        match decision {
            Ok(Decision::Respond(resp)) => {
                resp.write(session, &ctx.request_id).await?;
                Ok(true)
            }
            Ok(Decision::Continue) if ctx.pool.is_some() => Ok(false),
            Ok(Decision::Continue) => {
                tracing::error!(request_id = %ctx.request_id, route = %ctx.route, "local route: rules did not answer");
                LocalResponse::problem(500, "the rules did not answer this request")
                    .write(session, &ctx.request_id)
                    .await?;
                Ok(true)
            }
            Err(e) => {
                tracing::error!(request_id = %ctx.request_id, route = %ctx.route, error = %e, "rule error");
                LocalResponse::problem(500, "rule error; see the gateway log for this request id")
                    .write(session, &ctx.request_id)
                    .await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some(pool) = ctx.pool.clone() else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "no pool for route",
            ));
        };
        ctx.attempts += 1;
        let key = ctx
            .claims
            .as_ref()
            .and_then(|c| c.user_id())
            .unwrap_or(0)
            .to_be_bytes();
        let backend = pool
            .select(&key, ctx.last_backend)
            .or_else(|| pool.select(&key, None))
            .ok_or_else(|| {
                Error::explain(
                    ErrorType::HTTPStatus(503),
                    format!("pool {} has no healthy backend", pool.name),
                )
            })?;
        ctx.last_backend = backend.addr.as_inet().copied();
        let mut peer = HttpPeer::new(backend, false, String::new());
        let cfg = &pool.config;
        let ms = std::time::Duration::from_millis;
        peer.options.connection_timeout = Some(ms(cfg.connect_timeout_ms));
        peer.options.read_timeout = Some(ms(cfg.read_timeout_ms));
        peer.options.write_timeout = Some(ms(cfg.read_timeout_ms));
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let forwarded = match upstream
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) if !prev.trim().is_empty() => format!("{prev}, {client}"),
            _ => client,
        };
        upstream.insert_header("x-forwarded-for", forwarded)?;
        upstream.insert_header("x-request-id", ctx.request_id.as_str())?;
        for h in UNTRUSTED_HEADERS {
            upstream.remove_header(h);
        }
        if let Some(uid) = ctx.claims.as_ref().and_then(|c| c.user_id()) {
            upstream.insert_header("x-user-id", uid.to_string())?;
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(b) = body {
            ctx.body_bytes += b.len();
            if ctx.body_bytes > self.limits.max_body_bytes {
                return Err(Error::explain(
                    ErrorType::HTTPStatus(413),
                    "request body too large",
                ));
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        upstream_response.insert_header("x-request-id", ctx.request_id.as_str())?;
        if drain::is_draining() {
            upstream_response.insert_header("connection", "close")?;
            session.set_keepalive(None);
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        e.set_retry(Self::may_retry(session, ctx));
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("peer: {peer}"));
        let retry = Self::may_retry(session, ctx) && !session.as_ref().retry_buffer_truncated();
        e.set_retry(retry);
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let Some(status) = failure_status(e) else {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        let pool = ctx.pool.as_ref().map(|p| p.name.as_str());
        let detail = failure_detail(e, pool, ctx.attempts);
        // Pingora closes the client connection after a failed proxy attempt
        // (the request body may be half read); `Connection: close` tells the
        // client so it does not send its next request into a closing socket.
        session.set_keepalive(None);
        if let Err(write) = LocalResponse::problem(status, detail)
            .write(session, &ctx.request_id)
            .await
        {
            tracing::debug!(request_id = %ctx.request_id, error = %write, "error answer not written");
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        metrics::REQUESTS
            .with_label_values(&[ctx.route.as_str(), &status.to_string()])
            .inc();
        let elapsed = ctx.started.elapsed();
        metrics::LATENCY
            .with_label_values(&[ctx.route.as_str()])
            .observe(elapsed.as_secs_f64());
        if let Some(e) = e {
            tracing::warn!(request_id = %ctx.request_id, route = %ctx.route, status, error = %e, "request failed");
        }
        if let (Some(rules), Some(info)) = (&ctx.rules, &ctx.info) {
            rules.log(info, status, elapsed.as_secs_f64() * 1e3).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(kind: ErrorType) -> Box<Error> {
        Error::new_up(kind)
    }

    #[test]
    fn failure_status_tells_timeouts_from_broken_backends() {
        assert_eq!(
            failure_status(&upstream(ErrorType::ConnectTimedout)),
            Some(504)
        );
        assert_eq!(
            failure_status(&upstream(ErrorType::ReadTimedout)),
            Some(504)
        );
        assert_eq!(
            failure_status(&upstream(ErrorType::ConnectRefused)),
            Some(502)
        );
        assert_eq!(
            failure_status(&upstream(ErrorType::ConnectionClosed)),
            Some(502)
        );
        let refusal = Error::explain(
            ErrorType::HTTPStatus(503),
            "pool api has no healthy backend",
        );
        assert_eq!(failure_status(&refusal), Some(503));
        assert_eq!(
            failure_status(&Error::new_down(ErrorType::ConnectionClosed)),
            None,
            "nobody left to answer"
        );
        assert_eq!(
            failure_status(&Error::new_down(ErrorType::InvalidHTTPHeader)),
            Some(400)
        );
        assert_eq!(
            failure_status(&Error::new_in(ErrorType::InternalError)),
            Some(500)
        );
    }

    #[test]
    fn failure_detail_names_the_pool_and_kind_never_the_backend() {
        let e = upstream(ErrorType::ConnectRefused).more_context("peer: 127.0.0.1:8081");
        let detail = failure_detail(&e, Some("api"), 2);
        assert!(detail.contains("`api`"), "{detail}");
        assert!(detail.contains("ConnectRefused"), "{detail}");
        assert!(detail.contains("attempts: 2"), "{detail}");
        assert!(!detail.contains("8081"), "{detail}");
        let refusal = Error::explain(
            ErrorType::HTTPStatus(503),
            "pool api has no healthy backend",
        );
        assert_eq!(
            failure_detail(&refusal, Some("api"), 1),
            "pool api has no healthy backend"
        );
    }
}
