//! The admin listener (default 127.0.0.1:9090): metrics, upstream health,
//! rule status and reload, verification key status. Every route needs the
//! admin bearer token, compared in constant time, so a scraper or an
//! operator's curl carries `Authorization: Bearer <token>`.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::key_refresh::KeyRefresher;
use crate::metrics;
use crate::pools::Pool;
use crate::problem::problem_body;
use crate::rules::RuleEngine;

/// The admin HTTP app.
pub struct AdminApp {
    token: String,
    pools: BTreeMap<String, Arc<Pool>>,
    rules: Arc<RuleEngine>,
    keys: Arc<KeyRefresher>,
    /// Rules come from bundles: a local reload is refused.
    bundles: bool,
}

impl AdminApp {
    pub fn new(
        token: String,
        pools: BTreeMap<String, Arc<Pool>>,
        rules: Arc<RuleEngine>,
        keys: Arc<KeyRefresher>,
        bundles: bool,
    ) -> AdminApp {
        AdminApp {
            token,
            pools,
            rules,
            keys,
            bundles,
        }
    }

    fn authorized(&self, session: &ServerSession) -> bool {
        let Some(value) = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let Some(given) = value.strip_prefix("Bearer ") else {
            return false;
        };
        constant_time_eq(given.trim().as_bytes(), self.token.as_bytes())
    }

    /// Refreshes the upstream health gauges and returns the per-pool view.
    pub fn upstreams(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for (name, pool) in &self.pools {
            let health = pool.health();
            for b in &health {
                metrics::UPSTREAM_HEALTHY
                    .with_label_values(&[name.as_str(), b.addr.as_str()])
                    .set(i64::from(b.healthy));
            }
            out.insert(name.clone(), json!(health));
        }
        serde_json::Value::Object(out)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

fn problem(status: StatusCode, detail: &str) -> Response<Vec<u8>> {
    let body = problem_body(status.as_u16(), detail);
    respond(
        status,
        "application/problem+json",
        body.to_string().into_bytes(),
    )
}

fn json_ok(value: &serde_json::Value) -> Response<Vec<u8>> {
    respond(
        StatusCode::OK,
        "application/json",
        value.to_string().into_bytes(),
    )
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let method = session.req_header().method.clone();
        if path == "/healthz" {
            return json_ok(&json!({"status": "ok"}));
        }
        if !self.authorized(session) {
            let mut resp = problem(StatusCode::UNAUTHORIZED, "admin bearer token required");
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            return resp;
        }
        match (method.as_str(), path.as_str()) {
            ("GET", "/metrics") => {
                // Health gauges are sampled on scrape.
                let _ = self.upstreams();
                let _ = self.rules.services().broker_state();
                respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    metrics::render(),
                )
            }
            ("GET", "/admin/upstreams") => json_ok(&self.upstreams()),
            ("GET", "/admin/rules") => json_ok(&json!(self.rules.status())),
            ("GET", "/admin/keys") => json_ok(&json!(self.keys.status())),
            ("POST", "/admin/rules/reload") if self.bundles => problem(
                StatusCode::CONFLICT,
                "this gateway follows the fleet's rules bundles; change rules with `seckillctl rules push`",
            ),
            ("POST", "/admin/rules/reload") => {
                let engine = self.rules.clone();
                let result = tokio::task::spawn_blocking(move || engine.reload("admin")).await;
                match result {
                    Ok(Ok(reloaded)) => json_ok(&json!(reloaded)),
                    Ok(Err(e)) => {
                        let mut resp = problem(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string());
                        *resp.body_mut() = json!({
                            "type": "about:blank",
                            "title": "Unprocessable Entity",
                            "status": 422,
                            "detail": "the new rules were refused; the previous version keeps serving",
                            "errors": [e.to_string()],
                            "serving": self.rules.status(),
                        })
                        .to_string()
                        .into_bytes();
                        resp
                    }
                    Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
                }
            }
            _ => problem(StatusCode::NOT_FOUND, "no such admin route"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
