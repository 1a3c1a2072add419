//! Slow and half-open clients (issue 13, defect 12) against the real
//! gateway binary: thousands of connections that never send a byte, that
//! trickle their header one byte at a time, or that send half a header and
//! vanish must be closed once `client_header_timeout_ms` has passed, be
//! counted in `gateway_client_connections_closed_total` rather than logged
//! as errors, cost a few KB each while idle, and leave normal buyers'
//! latency alone. An idle keep-alive connection is closed after
//! `keepalive_timeout_ms`.
//!
//! Two phases, so each figure has one cause: first 5,000 idle connections
//! (memory per idle connection, closed by the header timeout), then 5,000
//! slow clients (4,500 tricklers, 500 that give up half way) while normal
//! clients keep requesting `/healthz` and a proxied route.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use seckill_contracts::testkit::TestEnv;
use support::{one_upstream_config, GatewayProc};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEADER_TIMEOUT: Duration = Duration::from_millis(2_000);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(3_000);
/// How late after its timeout a connection may be closed on a busy 2-core box.
const SLACK: Duration = Duration::from_millis(2_500);
/// How early: the gate's deadline starts at accept, a moment after connect.
const EARLY: Duration = Duration::from_millis(100);
const IDLE: usize = 5_000;
const TRICKLERS: usize = 4_500;
const ABORTERS: usize = 500;
/// Slow clients that still finish their header in time (and must be served).
const IN_TIME: usize = 50;
/// Connections opened at once; stays under the listen backlog (somaxconn).
const CONNECT_BATCH: usize = 250;

/// How one test-side connection ended.
#[derive(Debug, Default)]
struct Closed {
    /// Time from connect until the gateway closed it; `None`: still open
    /// when the test stopped waiting.
    after: Option<Duration>,
    /// What the gateway wrote before closing (a 408, or nothing).
    response: Vec<u8>,
}

/// Reads until the gateway closes the connection (EOF or reset), at most
/// until `connected + limit`.
async fn until_closed<R: AsyncRead + Unpin>(
    r: &mut R,
    connected: Instant,
    limit: Duration,
) -> Closed {
    let mut response = Vec::new();
    let mut chunk = [0u8; 1024];
    let deadline = tokio::time::Instant::from_std(connected + limit);
    loop {
        match tokio::time::timeout_at(deadline, r.read(&mut chunk)).await {
            Err(_) => {
                return Closed {
                    after: None,
                    response,
                }
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Closed {
                    after: Some(connected.elapsed()),
                    response,
                }
            }
            Ok(Ok(n)) => response.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Opens `n` connections that never send a byte, in batches, each watched
/// from the moment it connects until the gateway closes it.
async fn connect_idle(addr: SocketAddr, n: usize) -> Vec<tokio::task::JoinHandle<Closed>> {
    let mut all = Vec::with_capacity(n);
    while all.len() < n {
        let batch = CONNECT_BATCH.min(n - all.len());
        let opened = futures::future::join_all((0..batch).map(|_| async move {
            // Taken before connecting: the gateway's clock starts later.
            let connected = Instant::now();
            let s = TcpStream::connect(addr)
                .await
                .expect("connect to the gateway");
            (s, connected)
        }))
        .await;
        all.extend(opened.into_iter().map(|(mut s, connected)| {
            tokio::spawn(
                async move { until_closed(&mut s, connected, HEADER_TIMEOUT + SLACK).await },
            )
        }));
    }
    all
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// `gateway_client_connections_closed_total{reason="<reason>"}`, 0 if absent.
fn closed_metric(metrics: &str, reason: &str) -> u64 {
    let prefix = format!("gateway_client_connections_closed_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn status_of(response: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(response);
    text.split_whitespace().nth(1)?.parse().ok()
}

/// The earliest and latest close of `closed`, and how many stayed open.
fn close_span(closed: &[Closed]) -> (Duration, Duration, usize) {
    let times: Vec<Duration> = closed.iter().filter_map(|c| c.after).collect();
    let min = times.iter().min().copied().unwrap_or_default();
    let max = times.iter().max().copied().unwrap_or_default();
    (min, max, closed.len() - times.len())
}

/// Phase 1: `IDLE` connections that never send a byte. Returns the bytes of
/// gateway RSS per idle connection, how many were open when measured, and
/// how each connection ended.
async fn idle_connections(gw: &GatewayProc) -> (u64, usize, Vec<Closed>) {
    let pid = gw.process.pid();
    let (base_rss, base_fds) = (rss_kb(pid), open_fds(pid));
    let started = Instant::now();
    let watchers = connect_idle(gw.addr, IDLE).await;
    // Measured once the gateway holds (nearly) every connection, well
    // before the first is timed out; per connection actually open.
    let by = started + HEADER_TIMEOUT / 2;
    while open_fds(pid) < base_fds + IDLE && Instant::now() < by {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (rss, fds) = (rss_kb(pid), open_fds(pid));
    let open = fds.saturating_sub(base_fds);
    let per_conn = rss.saturating_sub(base_rss) * 1024 / open.max(1) as u64;
    let mut closed = Vec::with_capacity(IDLE);
    for w in watchers {
        closed.push(w.await.unwrap());
    }
    (per_conn, open, closed)
}

/// A connection that sends the start of a header, then one more byte every
/// `every`, never finishing it.
async fn trickle(addr: SocketAddr, every: Duration) -> Closed {
    // Taken before connecting: the gateway's clock starts later.
    let connected = Instant::now();
    let s = TcpStream::connect(addr)
        .await
        .expect("connect to the gateway");
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        if w.write_all(b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Slow: ")
            .await
            .is_err()
        {
            return;
        }
        loop {
            tokio::time::sleep(every).await;
            if w.write_all(b"a").await.is_err() {
                return;
            }
        }
    });
    let closed = until_closed(&mut r, connected, HEADER_TIMEOUT + SLACK).await;
    writer.abort();
    closed
}

/// A client that sends half a header and closes its connection.
async fn abort_half_way(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr)
        .await
        .expect("connect to the gateway");
    let _ = s
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: half\r\n")
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// A slow client that finishes in time: `request` in four pieces 100 ms
/// apart; returns the whole response (the request asks to close).
async fn slow_but_in_time(addr: SocketAddr, request: Vec<u8>) -> Vec<u8> {
    let mut s = TcpStream::connect(addr)
        .await
        .expect("connect to the gateway");
    for piece in request.chunks(request.len().div_ceil(4)) {
        s.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut response)).await;
    response
}

/// One keep-alive request, then idle: how long after the request the
/// gateway closed the connection (`None`: not within the timeout + slack).
async fn idle_after_one_request(addr: SocketAddr) -> Option<Duration> {
    let mut s = TcpStream::connect(addr)
        .await
        .expect("connect to the gateway");
    // Taken before the request: the gateway's idle clock starts later.
    let sent = Instant::now();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: keepalive\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    let mut chunk = [0u8; 1024];
    // The whole response: its header and `Content-Length` bytes of body.
    loop {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "closed before answering: {:?}",
            String::from_utf8_lossy(&response)
        );
        response.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&response).to_ascii_lowercase();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("content-length in the healthz answer");
            if response.len() >= end + 4 + length {
                break;
            }
        }
    }
    assert_eq!(status_of(&response), Some(200));
    until_closed(&mut s, sent, KEEPALIVE_TIMEOUT + SLACK)
        .await
        .after
}

/// Normal buyers: requests in a loop until `stop`, half on a keep-alive
/// client, half on a new connection each; returns (latencies, failures).
async fn normal_traffic(
    gw_url: impl Fn(&str) -> String,
    stop: Arc<AtomicBool>,
) -> (Vec<Duration>, Vec<String>) {
    let keepalive = reqwest::Client::new();
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let (mut latencies, mut failures) = (Vec::new(), Vec::new());
    while !stop.load(Ordering::Relaxed) {
        for (client, path) in [
            (&keepalive, "/healthz"),
            (&keepalive, "/api/v1/sales"),
            (&fresh, "/healthz"),
            (&fresh, "/api/v1/sales"),
        ] {
            let started = Instant::now();
            match client
                .get(gw_url(path))
                .timeout(Duration::from_secs(5))
                .send()
                .await
            {
                Ok(r) if r.status() == 200 => latencies.push(started.elapsed()),
                other => failures.push(format!("{path}: {other:?}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (latencies, failures)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// The gateway log: (lines, ERROR lines, ERROR lines about a client
/// connection, the first ERROR lines).
fn log_lines(log: &Path) -> (usize, usize, usize, Vec<String>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
    // Pingora's words for a client gone or failing mid-request.
    let about_clients = errors
        .iter()
        .filter(|l| l.contains("Downstream") || l.contains("request header"))
        .count();
    let first = errors.iter().take(3).map(|l| l.to_string()).collect();
    (text.lines().count(), errors.len(), about_clients, first)
}

/// Phase 2 as the clients saw it.
struct SlowPhase {
    trickled: Vec<Closed>,
    in_time: Vec<Option<u16>>,
    keepalive_closed: Option<Duration>,
    /// Normal requests' latencies, sorted.
    latencies: Vec<Duration>,
    failures: Vec<String>,
}

/// Phase 2: `TRICKLERS` + `ABORTERS` slow clients, `IN_TIME` slow clients
/// that finish, one idle keep-alive connection, normal traffic throughout.
async fn slow_clients(addr: SocketAddr) -> SlowPhase {
    let stop = Arc::new(AtomicBool::new(false));
    let url_base = format!("http://{addr}");
    let normal = tokio::spawn(normal_traffic(
        move |p| format!("{url_base}{p}"),
        stop.clone(),
    ));
    let keepalive_idle = tokio::spawn(idle_after_one_request(addr));
    let mut tricklers = Vec::with_capacity(TRICKLERS);
    for i in 0..TRICKLERS {
        let every = Duration::from_millis(600 + (i % 9) as u64 * 50);
        tricklers.push(tokio::spawn(trickle(addr, every)));
        if i % CONNECT_BATCH == CONNECT_BATCH - 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let aborters: Vec<_> = (0..ABORTERS)
        .map(|_| tokio::spawn(abort_half_way(addr)))
        .collect();
    let get = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    // Header and body in one write: the body bytes read with the header
    // must still reach the upstream.
    let post = format!(
        "POST /api/v1/auth/login HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    );
    let in_time: Vec<_> = (0..IN_TIME)
        .map(|i| {
            let req = if i % 2 == 0 { &get } else { &post };
            tokio::spawn(slow_but_in_time(addr, req.clone().into_bytes()))
        })
        .collect();
    let mut trickled = Vec::with_capacity(TRICKLERS);
    for t in tricklers {
        trickled.push(t.await.unwrap());
    }
    for a in aborters {
        a.await.unwrap();
    }
    let mut in_time_statuses = Vec::new();
    for t in in_time {
        in_time_statuses.push(status_of(&t.await.unwrap()));
    }
    let keepalive_closed = keepalive_idle.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let (mut latencies, failures) = normal.await.unwrap();
    latencies.sort();
    SlowPhase {
        trickled,
        in_time: in_time_statuses,
        keepalive_closed,
        latencies,
        failures,
    }
}

/// Everything measured, for one summary line and the checks.
struct Figures {
    idle_bytes: u64,
    idle_measured: usize,
    idle: Vec<Closed>,
    slow: SlowPhase,
    metrics: String,
    /// (lines, ERROR lines, ERROR lines about clients, first ERROR lines).
    log: (usize, usize, usize, Vec<String>),
}

impl Figures {
    fn counted(&self, reason: &str) -> usize {
        closed_metric(&self.metrics, reason) as usize
    }

    fn answered_408(&self) -> usize {
        let trickled = &self.slow.trickled;
        trickled
            .iter()
            .filter(|c| status_of(&c.response) == Some(408))
            .count()
    }

    fn summary(&self) -> String {
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
        let (idle_min, idle_max, idle_open) = close_span(&self.idle);
        let (slow_min, slow_max, slow_open) = close_span(&self.slow.trickled);
        let lat = &self.slow.latencies;
        let (lines, errors, client_errors, _) = &self.log;
        format!(
            "{} B of gateway RSS per idle connection ({} open); idle closed {}..{} \
             ({idle_open} open); tricklers closed {}..{} ({slow_open} open, {} got 408); \
             keep-alive closed after {:?}; normal p50 {:.1} ms p99 {:.1} ms over {} \
             requests, {} failures; gateway log {lines} lines ({errors} ERROR, \
             {client_errors} about clients); counted header_timeout={} idle_timeout={} \
             aborted={}",
            self.idle_bytes,
            self.idle_measured,
            ms(idle_min),
            ms(idle_max),
            ms(slow_min),
            ms(slow_max),
            self.answered_408(),
            self.slow.keepalive_closed.map(ms),
            percentile(lat, 0.5).as_secs_f64() * 1e3,
            percentile(lat, 0.99).as_secs_f64() * 1e3,
            lat.len(),
            self.slow.failures.len(),
            self.counted("header_timeout"),
            self.counted("idle_timeout"),
            self.counted("aborted"),
        )
    }

    /// Closed by the gateway after their timeout, not before, not much after.
    fn check_timeouts(&self) {
        let (idle_min, _, idle_open) = close_span(&self.idle);
        let (slow_min, _, slow_open) = close_span(&self.slow.trickled);
        assert_eq!(idle_open, 0, "idle connections outlived the header timeout");
        assert_eq!(slow_open, 0, "tricklers outlived the header timeout");
        assert!(
            idle_min + EARLY >= HEADER_TIMEOUT,
            "idle closed early: {idle_min:?}"
        );
        assert!(
            slow_min + EARLY >= HEADER_TIMEOUT,
            "trickler closed early: {slow_min:?}"
        );
        let odd: Vec<_> = self
            .slow
            .trickled
            .iter()
            .filter(|c| !c.response.is_empty() && status_of(&c.response) != Some(408))
            .map(|c| String::from_utf8_lossy(&c.response).into_owned())
            .take(3)
            .collect();
        assert!(odd.is_empty(), "tricklers answered other than 408: {odd:?}");
        let keepalive = self
            .slow
            .keepalive_closed
            .expect("idle keep-alive connection outlived its timeout");
        assert!(
            keepalive + EARLY >= KEEPALIVE_TIMEOUT,
            "keep-alive closed early: {keepalive:?}"
        );
    }

    /// Normal and in-time slow clients served, and quickly.
    fn check_service(&self) {
        let slow = &self.slow;
        assert!(
            slow.in_time.iter().all(|s| *s == Some(200)),
            "slow clients that finished in time: {:?}",
            slow.in_time
        );
        let failures = &slow.failures;
        assert!(
            failures.is_empty(),
            "normal requests failed: {:?}",
            &failures[..failures.len().min(5)]
        );
        assert!(slow.latencies.len() > 100, "too few normal requests");
        let p99 = percentile(&slow.latencies, 0.99);
        assert!(
            p99 < Duration::from_millis(200),
            "normal clients' p99 {p99:?}"
        );
    }

    /// Cheap while idle, counted in the metric, not written to the log.
    fn check_cost_and_counting(&self) {
        assert!(
            self.idle_measured >= IDLE * 9 / 10,
            "only {} idle connections open when measured",
            self.idle_measured
        );
        assert!(
            self.idle_bytes < 16 * 1024,
            "{} B RSS per idle connection",
            self.idle_bytes
        );
        let (lines, errors, client_errors, first) = &self.log;
        assert_eq!(*client_errors, 0, "ERROR lines about clients: {first:#?}");
        assert!(
            *errors < 20,
            "{errors} ERROR lines in the gateway log: {first:#?}"
        );
        assert!(
            *lines < 50,
            "{lines} log lines for {} slow connections",
            IDLE + TRICKLERS + ABORTERS
        );
        let timed_out = self.counted("header_timeout");
        assert!(
            (IDLE + TRICKLERS..IDLE + TRICKLERS + 10).contains(&timed_out),
            "header_timeout {timed_out}"
        );
        let aborted = self.counted("aborted");
        assert!(
            (ABORTERS..ABORTERS + 10).contains(&aborted),
            "aborted {aborted}"
        );
        assert!(
            self.counted("idle_timeout") >= 1,
            "idle_timeout not counted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_half_open_clients_are_timed_out_counted_and_cheap() {
    let env = TestEnv::new().await;
    let tmp = tempfile::tempdir().unwrap();
    let (_upstream, mut config) = one_upstream_config(&env, tmp.path()).await;
    config.gateway.client_header_timeout_ms = HEADER_TIMEOUT.as_millis() as u64;
    config.gateway.keepalive_timeout_ms = KEEPALIVE_TIMEOUT.as_millis() as u64;
    let log = tmp.path().join("gateway.log");
    let gw = GatewayProc::start_logged(config, &log).await;
    // Warm the request path so its one-time allocations are in the baseline.
    for path in ["/healthz", "/api/v1/sales"] {
        for _ in 0..20 {
            let _ = reqwest::get(gw.url(path)).await;
        }
    }

    let (idle_bytes, idle_measured, idle) = idle_connections(&gw).await;
    let slow = slow_clients(gw.addr).await;
    // The last closes counted before reading the metric.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let figures = Figures {
        idle_bytes,
        idle_measured,
        idle,
        slow,
        metrics: gw.metrics().await,
        log: log_lines(&log),
    };
    eprintln!("slow clients: {}", figures.summary());
    figures.check_timeouts();
    figures.check_service();
    figures.check_cost_and_counting();
}
