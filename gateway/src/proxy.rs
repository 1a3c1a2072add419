//! The edge's request lifecycle, hung on Pingora's `ProxyHttp` phases.
//!
//! ```text
//! request_filter      /healthz → 200; route lookup (404); header hygiene
//!                     (strip X-User-Id, request id); local routes answered here
//! upstream_peer       pick a healthy backend of the route's pool
//! upstream_request    X-Forwarded-For appended, X-Request-Id, X-User-Id
//! fail_to_connect /   one retry on another backend, idempotent methods only
//! error_while_proxy
//! response_filter     X-Request-Id on the way out
//! logging             metrics
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::{Error, ErrorType, Result};

use crate::metrics;
use crate::pools::Pool;
use crate::problem::LocalResponse;
use crate::routes::RouteTable;

/// Headers a client must never be able to set for the upstream.
const UNTRUSTED_HEADERS: [&str; 1] = ["x-user-id"];

/// The proxy's shared, read-only state.
pub struct EdgeProxy {
    routes: RouteTable,
    pools: BTreeMap<String, Arc<Pool>>,
}

/// Per-request state carried between phases.
pub struct RequestCtx {
    started: Instant,
    request_id: String,
    route: String,
    pool: Option<Arc<Pool>>,
    user_id: Option<u64>,
    /// Backend of the previous attempt; a retry avoids it.
    last_backend: Option<SocketAddr>,
    attempts: u32,
}

impl EdgeProxy {
    pub fn new(routes: RouteTable, pools: BTreeMap<String, Arc<Pool>>) -> EdgeProxy {
        EdgeProxy { routes, pools }
    }

    /// Idempotent methods may be sent to a second backend; a POST never is.
    fn may_retry(session: &Session, ctx: &RequestCtx) -> bool {
        ctx.attempts < 2 && session.req_header().method.is_idempotent()
    }
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
            user_id: None,
            last_backend: None,
            attempts: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        for h in UNTRUSTED_HEADERS {
            session.req_header_mut().remove_header(h);
        }
        let (method, path) = {
            let req = session.req_header();
            (req.method.as_str().to_string(), req.uri.path().to_string())
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
        ctx.route = matched.route.name.clone();
        match matched.route.pool.as_ref().and_then(|p| self.pools.get(p)) {
            Some(pool) => {
                ctx.pool = Some(pool.clone());
                Ok(false)
            }
            None => {
                LocalResponse::problem(404, "this route has no handler")
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
        let key = ctx.user_id.unwrap_or(0).to_be_bytes();
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
        peer.options.connection_timeout =
            Some(std::time::Duration::from_millis(cfg.connect_timeout_ms));
        peer.options.read_timeout = Some(std::time::Duration::from_millis(cfg.read_timeout_ms));
        peer.options.write_timeout = Some(std::time::Duration::from_millis(cfg.read_timeout_ms));
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
        if let Some(uid) = ctx.user_id {
            upstream.insert_header("x-user-id", uid.to_string())?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        upstream_response.insert_header("x-request-id", ctx.request_id.as_str())?;
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

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        metrics::REQUESTS
            .with_label_values(&[ctx.route.as_str(), &status.to_string()])
            .inc();
        metrics::LATENCY
            .with_label_values(&[ctx.route.as_str()])
            .observe(ctx.started.elapsed().as_secs_f64());
        if let Some(e) = e {
            tracing::warn!(request_id = %ctx.request_id, route = %ctx.route, status, error = %e, "request failed");
        }
    }
}
