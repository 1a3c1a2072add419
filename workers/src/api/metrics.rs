//! Request metrics and request-scoped tracing for the api.
//!
//! Every request gets a span carrying its `X-Request-Id` (the client's or
//! the gateway's when present and sane, else a fresh UUID), which is echoed
//! in the response so a buyer's complaint can be matched to log lines across
//! gateway and api. Counters and a latency histogram by matched route
//! pattern (never the raw path, which would explode label cardinality with
//! sale ids) go to the process-wide Prometheus registry that `/metrics`
//! serves.

use std::sync::LazyLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{
    register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge,
    HistogramVec, IntCounter, IntCounterVec, IntGauge,
};
use tracing::Instrument;

/// The correlation header, shared with the gateway.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "seckill_api_requests_total",
        "Requests answered by the api, by route pattern, method and status.",
        &["route", "method", "status"]
    )
    .expect("metric registers once")
});

static LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "seckill_api_request_duration_seconds",
        "Time to answer a request, by route pattern.",
        &["route"],
        vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
    )
    .expect("metric registers once")
});

static SALE_DB_LOADS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "seckill_api_sale_cache_db_loads_total",
        "Sale cache misses that read MySQL (one per key per single-flight)."
    )
    .expect("metric registers once")
});

static SALE_CACHE_HITS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "seckill_api_sale_cache_total",
        "Sale cache lookups by outcome (hit, null_hit, miss).",
        &["outcome"]
    )
    .expect("metric registers once")
});

static AUTH_FAILURES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "seckill_api_auth_failures_total",
        "Requests refused with 401 by the api's own token check."
    )
    .expect("metric registers once")
});

static CPU_JOBS_WAITING: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "seckill_api_cpu_jobs_waiting",
        "Password hashes and captcha renders waiting for a CPU slot (api.cpu_jobs)."
    )
    .expect("metric registers once")
});

/// Counts a CPU job as waiting for its slot while alive (drop-safe, so a
/// client that hangs up mid-wait is uncounted too).
pub struct CpuJobWaiting(());

impl CpuJobWaiting {
    pub fn enter() -> CpuJobWaiting {
        CPU_JOBS_WAITING.inc();
        CpuJobWaiting(())
    }
}

impl Drop for CpuJobWaiting {
    fn drop(&mut self) {
        CPU_JOBS_WAITING.dec();
    }
}

/// Counts a MySQL read of the sale loader.
pub fn sale_db_load() {
    SALE_DB_LOADS.inc();
}

/// Counts a sale cache lookup outcome.
pub fn sale_cache(outcome: &'static str) {
    SALE_CACHE_HITS.with_label_values(&[outcome]).inc();
}

/// Counts a 401 from the api's own token check.
pub fn auth_failure() {
    AUTH_FAILURES.inc();
}

/// A request id is echoed only when it is short and printable, so a client
/// cannot inject log lines or huge headers through it.
fn sane(id: &HeaderValue) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
}

/// Middleware: request id, span, metrics.
pub async fn track(mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().as_str().to_string();
    let request_id = match req.headers().get(&REQUEST_ID) {
        Some(v) if sane(v) => v.clone(),
        _ => {
            let id = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
                .unwrap_or(HeaderValue::from_static("unknown"));
            req.headers_mut().insert(REQUEST_ID.clone(), id.clone());
            id
        }
    };
    let span = tracing::info_span!(
        "request",
        request_id = request_id.to_str().unwrap_or(""),
        method = %method,
        route = %route,
        status = tracing::field::Empty,
    );
    let mut response = next.run(req).instrument(span.clone()).await;
    let status = response.status();
    span.record("status", status.as_u16());
    REQUESTS
        .with_label_values(&[route.as_str(), method.as_str(), status.as_str()])
        .inc();
    LATENCY
        .with_label_values(&[route.as_str()])
        .observe(start.elapsed().as_secs_f64());
    if status.is_server_error() {
        span.in_scope(|| tracing::warn!(status = status.as_u16(), "request failed"));
    }
    response
        .headers_mut()
        .insert(REQUEST_ID.clone(), request_id);
    response
}
