//! Malformed and oversized HTTP at the edge: refused with a 4xx (or the
//! connection closed), and nothing reaches an upstream.

mod support;

use std::time::Duration;

use seckill_contracts::testkit::TestEnv;
use support::{one_upstream_config, GatewayProc, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(request).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

fn status_of(response: &str) -> Option<u16> {
    response.split_whitespace().nth(1)?.parse().ok()
}

/// A gateway in front of one upstream, refusing headers over 8 KiB and
/// bodies over 1 KiB; its log goes to `gateway.log` in the returned folder.
async fn refusing_gateway() -> (TestEnv, tempfile::TempDir, Upstream, GatewayProc) {
    let env = TestEnv::new().await;
    let tmp = tempfile::tempdir().unwrap();
    let (upstream, mut config) = one_upstream_config(&env, tmp.path()).await;
    config.gateway.max_header_bytes = 8 * 1024;
    config.gateway.max_body_bytes = 1024;
    let gw = GatewayProc::start_logged(config, &tmp.path().join("gateway.log")).await;
    (env, tmp, upstream, gw)
}

#[tokio::test]
async fn smuggling_and_oversize_are_refused_before_any_upstream() {
    let (_env, _tmp, upstream, gw) = refusing_gateway().await;
    let host = gw.addr;

    let cl_te = format!(
        "POST /api/v1/auth/login HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    let two_cl = format!(
        "POST /api/v1/auth/login HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"
    );
    let big_header = format!(
        "GET /api/v1/sales HTTP/1.1\r\nHost: {host}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(10 * 1024)
    );
    let big_body = format!(
        "POST /api/v1/auth/login HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5000\r\n\r\n{}",
        "a".repeat(5000)
    );
    let chunk = "a".repeat(800);
    let big_chunked = format!(
        "POST /api/v1/auth/login HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n320\r\n{chunk}\r\n320\r\n{chunk}\r\n0\r\n\r\n"
    );
    for (name, req, want) in [
        ("CL+TE", cl_te, None),
        ("two Content-Lengths", two_cl, Some(400)),
        ("oversized headers", big_header, Some(431)),
        ("oversized body", big_body, Some(413)),
        ("oversized chunked body", big_chunked, None),
    ] {
        let resp = raw(host, req.as_bytes()).await;
        match (status_of(&resp), want) {
            (Some(got), Some(want)) => assert_eq!(got, want, "{name}: {resp}"),
            (Some(got), None) => assert!((400..500).contains(&got), "{name}: {resp}"),
            (None, _) => {} // closed without a response: acceptable
        }
    }
    let garbage = raw(host, b"\x16\x03\x01garbage\r\n\r\n").await;
    if let Some(code) = status_of(&garbage) {
        assert!((400..500).contains(&code), "{garbage}");
    }
    assert_eq!(upstream.hits(), 0, "a bad request reached the upstream");

    // And the edge still serves.
    let ok = reqwest::get(gw.url("/api/v1/sales")).await.unwrap();
    assert_eq!(ok.status(), 200);
}

/// A refused request gets one answer and one log line: 1,000 oversized
/// requests, each read back whole from its own connection, and the
/// gateway's log searched for their request ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_refusal_is_answered_and_logged_once() {
    let (_env, tmp, upstream, gw) = refusing_gateway().await;
    let log = tmp.path().join("gateway.log");
    let request = format!(
        "POST /api/v1/auth/login HTTP/1.1\r\nHost: {}\r\nContent-Length: 5000\r\n\r\n",
        gw.addr
    );
    let mut ids = Vec::new();
    for _ in 0..1_000 {
        let response = raw(gw.addr, request.as_bytes()).await;
        assert_eq!(status_of(&response), Some(413), "{response}");
        assert_eq!(
            response.matches("HTTP/1.1 ").count(),
            1,
            "one answer per request: {response}"
        );
        let id = response
            .lines()
            .find_map(|l| l.strip_prefix("x-request-id: "))
            .expect("every answer carries its request id")
            .trim()
            .to_string();
        ids.push(id);
    }
    assert_eq!(upstream.hits(), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    for id in &ids {
        let lines = text.lines().filter(|l| l.contains(id.as_str())).count();
        assert_eq!(lines, 1, "request {id} logged {lines} times");
    }
    let pingora_errors = text.lines().filter(|l| l.contains("Fail to")).count();
    assert_eq!(pingora_errors, 0, "no second, error-path line per refusal");
}
