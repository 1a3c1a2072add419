//! Malformed and oversized HTTP at the edge: refused with a 4xx (or the
//! connection closed), and nothing reaches an upstream.

mod support;

use std::time::Duration;

use seckill_contracts::testkit::TestEnv;
use support::{write_rules, GatewayProc, Upstream};
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

#[tokio::test]
async fn smuggling_and_oversize_are_refused_before_any_upstream() {
    let env = TestEnv::new().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lua");
    write_rules(&dir, "return { access = function(req) end }", &[]);
    let upstream = Upstream::start("a").await;
    let mut config = GatewayProc::config(&env, &[upstream.addr], &dir);
    config.gateway.max_header_bytes = 8 * 1024;
    config.gateway.max_body_bytes = 1024;
    let gw = GatewayProc::start(config).await;
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
