//! The gateway's Prometheus metrics, registered once in the default registry
//! and served by the admin listener's `/metrics`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::LazyLock;

use prometheus::{
    register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge,
    register_int_gauge_vec, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec,
};

/// Requests by route name and final status.
pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "gateway_requests_total",
        "Requests handled, by route and response status",
        &["route", "status"]
    )
    .expect("metric registers once")
});

/// End-to-end latency as the gateway sees it.
pub static LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "gateway_request_duration_seconds",
        "Time from request header to response end, by route",
        &["route"],
        vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
    )
    .expect("metric registers once")
});

/// One route's [`REQUESTS`] counters (by status) and [`LATENCY`]
/// histogram, looked up once per thread instead of once per request.
struct RouteHandles {
    latency: Histogram,
    by_status: Vec<(u16, IntCounter)>,
}

thread_local! {
    /// Bounded: one entry per route name (the config's, `healthz`,
    /// `unmatched`) and, under it, one per status code seen.
    static ROUTE_HANDLES: RefCell<HashMap<String, RouteHandles>> = RefCell::new(HashMap::new());
}

/// Counts a finished request of `route` with `status` and observes its
/// latency. A label lookup hashes the label values under a lock and the
/// status needs formatting: together about 2 % of a sold-out request's
/// CPU in its profile, so the handles are kept per thread.
pub fn observe_request(route: &str, status: u16, seconds: f64) {
    ROUTE_HANDLES.with(|handles| {
        let mut handles = handles.borrow_mut();
        if !handles.contains_key(route) {
            let latency = LATENCY.with_label_values(&[route]);
            handles.insert(
                route.to_string(),
                RouteHandles {
                    latency,
                    by_status: Vec::new(),
                },
            );
        }
        let Some(handles) = handles.get_mut(route) else {
            return;
        };
        handles.latency.observe(seconds);
        match handles.by_status.iter().find(|(s, _)| *s == status) {
            Some((_, counter)) => counter.inc(),
            None => {
                let counter = REQUESTS.with_label_values(&[route, &status.to_string()]);
                counter.inc();
                handles.by_status.push((status, counter));
            }
        }
    });
}

/// Lua rule failures (errors, budget overruns) by phase.
pub static LUA_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "gateway_lua_errors_total",
        "Lua rule errors by phase and kind",
        &["phase", "kind"]
    )
    .expect("metric registers once")
});

/// Polls of a rule call from a thread other than its VM's own. The design
/// (one single-threaded runtime per proxy thread) keeps this at 0; anything
/// else means requests migrate between threads and share VMs.
pub static LUA_VM_FOREIGN_POLLS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "gateway_lua_vm_foreign_polls_total",
        "Rule-call polls made on a thread other than the one that owns the Lua VM (should stay 0)"
    )
    .expect("metric registers once")
});

/// Redis Cluster connections replaced because no call on them came back
/// for `redis.cluster_stall_ms` (see `seckill_contracts::redis_client`);
/// read from the process-wide count at every scrape.
pub static REDIS_CONNECTIONS_REPLACED: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "gateway_redis_connections_replaced",
        "Redis Cluster connections replaced after they stopped answering (since start)"
    )
    .expect("metric registers once")
});

/// 1 while the order publisher holds an open link to RabbitMQ.
pub static BROKER_CONNECTED: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "gateway_broker_connected",
        "1 while the order publisher's RabbitMQ connection and channels are open"
    )
    .expect("metric registers once")
});

/// JWKS fetches by what triggered them and how they ended.
pub static JWKS_FETCHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "gateway_jwks_fetches_total",
        "Fetches of the api's key set, by trigger (startup, interval, unknown_kid) and outcome",
        &["trigger", "outcome"]
    )
    .expect("metric registers once")
});

/// Keys that verify tokens right now.
pub static JWT_KEYS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "gateway_jwt_keys",
        "Verification keys in force (configured plus fetched)"
    )
    .expect("metric registers once")
});

/// Rule reload attempts by result (ok / refused).
pub static RULE_RELOADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "gateway_rule_reloads_total",
        "Rule reload attempts by trigger and result",
        &["trigger", "result"]
    )
    .expect("metric registers once")
});

/// JWT rejections by reason (missing, expired, bad_signature, ...).
pub static JWT_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "gateway_jwt_failures_total",
        "Requests refused by the JWT check, by reason",
        &["reason"]
    )
    .expect("metric registers once")
});

/// Limiter rejections by limiter kind (local token bucket, Redis window).
pub static LIMITER_REJECTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "gateway_limiter_rejections_total",
        "Requests refused by a limiter, by limiter",
        &["limiter"]
    )
    .expect("metric registers once")
});

/// 1 when a backend passes its health check, 0 when not.
pub static UPSTREAM_HEALTHY: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "gateway_upstream_healthy",
        "Health of each upstream backend (1 healthy)",
        &["pool", "backend"]
    )
    .expect("metric registers once")
});

/// Counters that rules bump with `seckill.counter(name)`.
pub static RULE_COUNTERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "gateway_rule_events_total",
        "Events counted by the Lua rules, by name",
        &["name"]
    )
    .expect("metric registers once")
});

pub static RULE_SHORTCUTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "gateway_rule_shortcuts_total",
        "Requests answered from a rule's stored answer without running Lua, by route",
        &["route"]
    )
    .expect("metric registers once")
});

/// How long an admitted request waits for the broker: publish to publisher
/// confirm (or to the failure), by outcome. During a sell-out this wait is
/// most of an admitted buyer's latency, so it is what to watch when the
/// seckill route's tail grows.
pub static PUBLISH_CONFIRM: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "gateway_publish_confirm_seconds",
        "Order message publish until the publisher confirm or the failure, by outcome",
        &["outcome"],
        vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
    )
    .expect("metric registers once")
});

/// How long sale notices take from their publisher (any gateway, api or
/// worker) to this gateway, by kind: the time during which this gateway
/// still admits to Redis for a sale another gateway already saw sell out.
/// Measured against the publisher's wall clock, so on real hosts it also
/// shows their clock skew.
pub static SALE_EVENT_DELAY: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "gateway_sale_event_delay_seconds",
        "Sale notice publish until this gateway applied it, by kind",
        &["kind"],
        vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
    )
    .expect("metric registers once")
});

/// Client connections that ended before a whole request header arrived,
/// by reason: `header_timeout` (no whole header within
/// `client_header_timeout_ms`), `idle_timeout` (a kept-alive connection
/// idle for `keepalive_timeout_ms`), `aborted` (the client left half way
/// through its header), `header_too_large` (431). Counted rather than
/// logged: a slowloris or a port scan must not write a log line per
/// connection.
pub static CLIENT_CONNECTIONS_CLOSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "gateway_client_connections_closed_total",
        "Client connections closed before a whole request header arrived, by reason",
        &["reason"]
    )
    .expect("metric registers once")
});

/// Prometheus text exposition of every registered metric.
pub fn render() -> Vec<u8> {
    use prometheus::Encoder;
    REDIS_CONNECTIONS_REPLACED
        .set(seckill_contracts::redis_client::stalled_connections_replaced() as i64);
    let mut buf = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&prometheus::gather(), &mut buf);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_thread_handles_count_into_the_shared_metrics() {
        let route = "metrics_test_route";
        observe_request(route, 201, 0.001);
        observe_request(route, 201, 0.002);
        observe_request(route, 404, 0.003);
        // Another thread resolves its own handles to the same series.
        std::thread::spawn(move || observe_request(route, 201, 0.004))
            .join()
            .expect("thread");
        assert_eq!(REQUESTS.with_label_values(&[route, "201"]).get(), 3);
        assert_eq!(REQUESTS.with_label_values(&[route, "404"]).get(), 1);
        let latency = LATENCY.with_label_values(&[route]);
        assert_eq!(latency.get_sample_count(), 4);
        assert!((latency.get_sample_sum() - 0.010).abs() < 1e-9);
    }
}
