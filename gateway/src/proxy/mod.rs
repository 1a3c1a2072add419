//! The edge's request lifecycle, hung on Pingora's `ProxyHttp` phases.
//!
//! ```text
//! request_filter        the ordered edge steps of [`steps`]: malformed
//!                       requests refused, untrusted headers stripped,
//!                       /healthz, route, JWT, web file, rule shortcut, local body,
//!                       Lua `access` → answer locally or go on to the pool,
//!                       unless the micro-cache has the page
//! upstream_peer         a healthy backend of the route's pool
//! upstream_request      X-Forwarded-For appended, X-Request-Id, X-User-Id
//! request_body_filter   body bytes capped (413); proxied routes refuse
//!                       chunked bodies (411) so nothing partial goes upstream
//! fail_to_connect /     one retry on another backend, idempotent methods only
//! error_while_proxy
//! fail_to_proxy         what is left after the retry: a problem+json naming
//!                       the failure ([`failure`]: 502, 504, 503 no backend)
//! response_filter       X-Request-Id on the way out; Connection: close
//!                       while draining; a cached route's fetch sees the
//! response_body_filter  answer go by and stores it (`micro_cache`)
//! logging               metrics, Lua `log` phase
//! ```
//!
//! Every answer the gateway writes itself comes out of `request_filter`
//! (one answer, no error path), so each request is answered and logged
//! once.

mod failure;
mod steps;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorType, Result};
use seckill_contracts::claims::AccessClaims;

use crate::drain;
use crate::key_refresh::KeyRefresher;
use crate::metrics;
use crate::micro_cache::{Fill, MicroCache};
use crate::pools::{Pool, Pools};
use crate::problem::LocalResponse;
use crate::routes::RouteTable;
use crate::rules::{RequestInfo, RuleEngine, RuleSet};
use crate::web_files::WebFiles;

use failure::{failure_detail, failure_status};
use steps::{Flow, UNTRUSTED_HEADERS};

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
    keys: Arc<KeyRefresher>,
    rules: Arc<RuleEngine>,
    web: Arc<WebFiles>,
    cache: Arc<MicroCache>,
    limits: RequestLimits,
}

/// Per-request state carried between phases.
pub struct RequestCtx {
    started: Instant,
    request_id: String,
    route: String,
    /// The matched route's path parameters.
    params: Vec<(String, String)>,
    /// The matched route needs no JWT.
    public: bool,
    /// The matched route is answered from the web files.
    files: bool,
    /// The matched route's micro-cache freshness (0: not cached).
    cache_ms: u64,
    /// This request fetches its page for the micro-cache.
    cache_fill: Option<Fill>,
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
        keys: Arc<KeyRefresher>,
        rules: Arc<RuleEngine>,
        web: Arc<WebFiles>,
        cache: Arc<MicroCache>,
        limits: RequestLimits,
    ) -> EdgeProxy {
        EdgeProxy {
            routes,
            pools,
            keys,
            rules,
            web,
            cache,
            limits,
        }
    }

    /// Idempotent methods may go to a second backend; a POST never does.
    fn may_retry(session: &Session, ctx: &RequestCtx) -> bool {
        ctx.attempts < 2 && session.req_header().method.is_idempotent()
    }

    /// The edge steps in order (see [`steps`]); the first answer wins.
    async fn edge_steps(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<Flow> {
        let answer = |a| Ok(Flow::Answer(a));
        if let Some(a) =
            steps::refuse_malformed(session.req_header(), &self.limits, &ctx.request_id)
        {
            return answer(a);
        }
        steps::strip_untrusted(session.req_header_mut());
        let broker = || self.rules.services().broker_state();
        if let Some(a) = steps::health(session.req_header(), broker) {
            ctx.route = "healthz".into();
            return answer(a);
        }
        if let Some(a) = steps::route(&self.routes, &self.pools, session.req_header(), ctx) {
            return answer(a);
        }
        match steps::authenticate(&self.keys, session.req_header(), ctx.public).await {
            Ok(claims) => ctx.claims = claims,
            Err(a) => return answer(a),
        }
        if ctx.files {
            return answer(steps::web_file(&self.web, session.req_header()));
        }
        let rules = self.rules.current();
        if let Some(a) = steps::shortcut(&rules, ctx) {
            return answer(a);
        }
        let flow = if rules.handles(&ctx.route) {
            let body = match steps::local_body(session, &self.limits, ctx).await? {
                Ok(body) => body,
                Err(a) => return answer(a),
            };
            let info = steps::request_info(session, ctx, body);
            let flow = steps::rules(&rules, &info, ctx).await;
            ctx.rules = Some(rules);
            ctx.info = Some(info);
            flow
        } else {
            steps::without_rules(ctx)
        };
        if let Flow::Proxy = flow {
            if let Some(a) = steps::micro_cache(&self.cache, session.req_header(), ctx).await {
                return answer(a);
            }
        }
        Ok(flow)
    }

    /// The consistent-hashing key: the verified user, so a buyer keeps one
    /// backend; for anonymous requests the client's address, so public
    /// routes spread over the pool instead of all landing on one backend.
    fn hash_key(session: &Session, ctx: &RequestCtx) -> Vec<u8> {
        match ctx.claims.as_ref().and_then(|c| c.user_id()) {
            Some(user) => user.to_be_bytes().to_vec(),
            None => steps::client_ip(session).into_bytes(),
        }
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
            params: Vec::new(),
            public: false,
            files: false,
            cache_ms: 0,
            cache_fill: None,
            pool: None,
            claims: None,
            rules: None,
            info: None,
            last_backend: None,
            attempts: 0,
            body_bytes: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        match self.edge_steps(session, ctx).await? {
            Flow::Answer(answer) => {
                answer.write(session, &ctx.request_id).await?;
                Ok(true)
            }
            Flow::Proxy => Ok(false),
        }
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some(pool) = ctx.pool.clone() else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "no pool for route",
            ));
        };
        ctx.attempts += 1;
        let key = Self::hash_key(session, ctx);
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
        let client = steps::client_ip(session);
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
        if ctx.cache_ms > 0 {
            if let Some(fill) = ctx.cache_fill.as_mut() {
                fill.response(upstream_response);
            }
            let status = if ctx.cache_fill.is_some() {
                "MISS"
            } else {
                "BYPASS"
            };
            upstream_response.insert_header("x-cache", status)?;
        }
        if drain::is_draining() {
            upstream_response.insert_header("connection", "close")?;
            session.set_keepalive(None);
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        if let Some(fill) = ctx.cache_fill.as_mut() {
            fill.body(body.as_ref(), end_of_stream);
        }
        Ok(None)
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
        // A fetch that did not store its page ends here, so a waiter
        // takes over at once rather than after its wait.
        ctx.cache_fill = None;
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let elapsed = ctx.started.elapsed();
        metrics::observe_request(&ctx.route, status, elapsed.as_secs_f64());
        if let Some(e) = e {
            tracing::warn!(request_id = %ctx.request_id, route = %ctx.route, status, error = %e, "request failed");
        }
        if let (Some(rules), Some(info)) = (&ctx.rules, &ctx.info) {
            rules.log(info, status, elapsed.as_secs_f64() * 1e3).await;
        }
    }
}
