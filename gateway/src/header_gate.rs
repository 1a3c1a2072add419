//! The header gate: what a client connection must get through before
//! Pingora sees a request on it.
//!
//! Why it exists. Pingora's HTTP/1 server reads a request header with a
//! timeout per read, not for the whole header, so a client that trickles a
//! byte every few seconds keeps its connection for ever (slowloris). A
//! client that leaves half way through its header is logged as an ERROR
//! (`Fail to proxy: Downstream ConnectionClosed ... while reading request
//! headers`), one line per connection. And an accepted connection holds its
//! full request state while it idles: the listener's 64 KB read buffer, a
//! 4 KB header buffer and the boxed request future, ~90 KB per connection
//! where nginx holds ~1 KB until a request arrives.
//!
//! What it does, per connection (HTTP/1.x over plain TCP: what the edge's
//! listener speaks; an h2 stream from ALPN goes straight to Pingora):
//!
//! ```text
//! accept ─▶ wait for the first bytes, holding no buffer
//!           │  fresh connection: until the header deadline (accept + client_header_timeout_ms)
//!           │  kept-alive one:   keepalive_timeout_ms       ─▶ close   reason=idle_timeout
//!           │  shutdown begins:  close at once; client leaves: close (both normal, uncounted)
//!           ▼
//!           read into a header_buffer_bytes buffer, doubling up to max_header_bytes,
//!           until the blank line that ends the header, all under one deadline
//!           │  deadline ─▶ 408 problem+json if any byte came, close  reason=header_timeout
//!           │  EOF/reset ─▶ close                                    reason=aborted
//!           │  too big ─▶ 431 problem+json, close                     reason=header_too_large
//!           ▼
//!           a Pingora ServerSession over the stream, with the bytes read as its
//!           pipelined prefix: Pingora parses the header from them without
//!           reading again, and body bytes after the header stay in the session
//!           ▼
//!           HttpProxy::process_new_http (the EdgeProxy phases) ─▶ reusable: loop
//! ```
//!
//! The gate closes are counted in `gateway_client_connections_closed_total`
//! and logged at debug level only. The big per-request state exists only
//! from a complete header to the end of its response; between requests a
//! connection holds its socket, this small future and Pingora's persistent
//! settings. HTTP/1.1 pipelining stays off (Pingora's default), so a
//! finished request never leaves a prefix of its own for the next one.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use seckill_contracts::config::GatewayConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::time::{sleep_until, timeout, timeout_at, Instant};

use crate::metrics;
use crate::problem::problem_body;

/// Bytes of the first read, taken onto the stack for one poll: an idle
/// connection waits for data without owning any buffer.
const FIRST_READ_BYTES: usize = 1024;
/// How long writing a 408/431 answer may take: a client that does not read
/// must not hold its connection through the answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
/// After a 431, the rest of the oversized header is read and dropped for
/// this long (or this many bytes) before closing, so the close does not
/// reset the connection before the client has read the answer.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// The gate's limits, from `[gateway]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateLimits {
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub header_buffer_bytes: usize,
    pub max_header_bytes: usize,
}

impl GateLimits {
    pub fn from_config(g: &GatewayConfig) -> GateLimits {
        GateLimits {
            header_timeout: Duration::from_millis(g.client_header_timeout_ms),
            keepalive_timeout: Duration::from_millis(g.keepalive_timeout_ms),
            header_buffer_bytes: g.header_buffer_bytes,
            max_header_bytes: g.max_header_bytes,
        }
    }

    /// Pingora's own keep-alive setting, in whole seconds (at least 1; its
    /// 0 means "for ever"). It only limits reads Pingora makes itself, which
    /// for a header the gate passed whole are none: the gate's timer rules.
    fn pingora_keepalive_secs(&self) -> u64 {
        self.keepalive_timeout.as_millis().div_ceil(1000).max(1) as u64
    }
}

/// The listener for the edge: TCP with no L4 read buffer. Pingora's
/// default allocates a 64 KB read buffer per accepted connection before
/// the first byte; on plain TCP every reader (this gate, Pingora's header
/// and body readers) reads into its own buffer anyway, so it only costs
/// memory. Write buffering keeps Pingora's default.
pub fn listener(addr: &str) -> ListenerConfig {
    ListenerConfig::tcp(addr).l4_buffer(L4BufferSettings {
        read: Some(0),
        write: None,
    })
}

/// A [`ServerApp`] that lets `app` (the edge's `HttpProxy`) see only
/// connections that delivered a whole request header in time.
pub struct HeaderGate<A> {
    app: Arc<A>,
    limits: GateLimits,
    /// The 408 and 431 answers, rendered once: when thousands of slow
    /// clients time out together, each answer is one write of shared bytes.
    timeout_answer: Bytes,
    too_large_answer: Bytes,
}

/// Why a connection ends before Pingora saw a request on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The client closed or reset a connection with no request started:
    /// the normal end of keep-alive.
    ClientLeft,
    /// Shutdown began while the connection was idle.
    ShuttingDown,
    IdleTimeout,
    /// `started`: some bytes of a header had arrived (they get a 408).
    HeaderTimeout {
        started: bool,
    },
    Aborted,
    TooLarge,
}

impl Ending {
    /// The metric label; `None` for the normal ends nobody needs counted.
    fn reason(self) -> Option<&'static str> {
        match self {
            Ending::ClientLeft | Ending::ShuttingDown => None,
            Ending::IdleTimeout => Some("idle_timeout"),
            Ending::HeaderTimeout { .. } => Some("header_timeout"),
            Ending::Aborted => Some("aborted"),
            Ending::TooLarge => Some("header_too_large"),
        }
    }
}

impl<A> HeaderGate<A> {
    pub fn new(app: A, limits: GateLimits) -> HeaderGate<A> {
        // Every reason shows on /metrics from the start, at 0.
        for reason in [
            "header_timeout",
            "idle_timeout",
            "aborted",
            "header_too_large",
        ] {
            metrics::CLIENT_CONNECTIONS_CLOSED.with_label_values(&[reason]);
        }
        HeaderGate {
            app: Arc::new(app),
            limits,
            timeout_answer: render_answer(408, "the request header did not arrive in time"),
            too_large_answer: render_answer(431, "request headers too large"),
        }
    }

    /// The next request's header (and whatever followed it in the same
    /// reads), or why the connection ends. `fresh`: the connection's first
    /// request, whose header deadline runs from the accept.
    async fn read_head(
        &self,
        stream: &mut Stream,
        fresh: bool,
        shutdown_begun: Pin<&mut impl Future<Output = ()>>,
    ) -> Result<BytesMut, Ending> {
        let idle_for = if fresh {
            self.limits.header_timeout
        } else {
            self.limits.keepalive_timeout
        };
        let idle_deadline = Instant::now() + idle_for;
        let first = tokio::select! {
            biased;
            read = first_read(stream, self.limits.header_buffer_bytes) => read,
            _ = sleep_until(idle_deadline) => {
                return Err(if fresh {
                    Ending::HeaderTimeout { started: false }
                } else {
                    Ending::IdleTimeout
                });
            }
            _ = shutdown_begun => return Err(Ending::ShuttingDown),
        };
        let Ok(Some(buf)) = first else {
            return Err(Ending::ClientLeft);
        };
        let deadline = if fresh {
            idle_deadline
        } else {
            Instant::now() + self.limits.header_timeout
        };
        self.rest_of_head(stream, buf, deadline).await
    }

    /// Reads until `buf` holds a whole header, growing it by doubling but
    /// never past `max_header_bytes`.
    async fn rest_of_head(
        &self,
        stream: &mut Stream,
        mut buf: BytesMut,
        deadline: Instant,
    ) -> Result<BytesMut, Ending> {
        let max = self.limits.max_header_bytes;
        let mut scanned = 0;
        loop {
            if let Some(end) = header_end(&buf, scanned) {
                return if end <= max {
                    Ok(buf)
                } else {
                    Err(Ending::TooLarge)
                };
            }
            if buf.len() >= max {
                return Err(Ending::TooLarge);
            }
            scanned = buf.len();
            if buf.len() == buf.capacity() {
                buf.reserve(buf.capacity().clamp(1, max - buf.len()));
            }
            match timeout_at(deadline, stream.read_buf(&mut buf)).await {
                Err(_) => return Err(Ending::HeaderTimeout { started: true }),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(Ending::Aborted),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// A Pingora session for a header the gate let through.
    fn session(
        &self,
        stream: Stream,
        head: BytesMut,
        settings: Option<HttpPersistentSettings>,
        shutdown: &ShutdownWatch,
    ) -> ServerSession
    where
        A: HttpServerApp,
    {
        let mut session = ServerSession::new_http1(stream);
        match settings {
            // Keep-alive state carried from the previous request
            // (reuses left, user context), as Pingora's own loop does.
            Some(settings) => settings.apply_to_session(&mut session),
            None => {
                session.set_keepalive(Some(self.limits.pingora_keepalive_secs()));
                session.set_keepalive_reuses_remaining(
                    self.app
                        .server_options()
                        .and_then(|o| o.keepalive_request_limit),
                );
            }
        }
        if *shutdown.borrow() {
            // Answer this request, then close: the process is going away.
            session.set_keepalive(None);
        }
        session.set_pipelined_prefix(head);
        session
    }

    /// Ends a connection the gate refused: counts it, answers when there
    /// is a request to answer, and closes.
    ///
    /// A 408 goes, as RFC 9110 allows, to a connection that sent part of a
    /// header: a real buyer on a bad network then learns why instead of
    /// seeing a bare close. One that sent nothing gets no answer: there is
    /// no request to answer.
    async fn close(&self, mut stream: Stream, ending: Ending) {
        if let Some(reason) = ending.reason() {
            metrics::CLIENT_CONNECTIONS_CLOSED
                .with_label_values(&[reason])
                .inc();
            tracing::debug!(
                reason,
                "client connection closed before a whole request header"
            );
        }
        match ending {
            Ending::HeaderTimeout { started: true } => {
                answer(&mut stream, &self.timeout_answer).await;
            }
            Ending::TooLarge => {
                answer(&mut stream, &self.too_large_answer).await;
                linger(&mut stream).await;
            }
            _ => {}
        }
    }
}

/// A whole problem+json response that closes the connection. It carries no
/// `x-request-id`: no request was parsed, and nothing is logged to match.
fn render_answer(status: u16, detail: &str) -> Bytes {
    let body = problem_body(status, detail).to_string();
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    Bytes::from(format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/problem+json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    ))
}

/// Writes `answer` straight onto the stream (there is no session yet) and
/// shuts the write side, within [`ANSWER_TIMEOUT`].
async fn answer(stream: &mut Stream, answer: &[u8]) {
    let write = async {
        stream.write_all(answer).await?;
        stream.flush().await?;
        stream.shutdown().await
    };
    if let Ok(Err(e)) | Err(e) = timeout(ANSWER_TIMEOUT, write)
        .await
        .map_err(std::io::Error::from)
    {
        tracing::debug!(error = %e, "gate answer not written");
    }
}

/// Reads and drops what the client still sends, briefly, so closing with
/// unread bytes does not reset the connection under the answer just sent.
async fn linger(stream: &mut Stream) {
    let mut sink = vec![0u8; 4096];
    let drain = async {
        let mut total = 0;
        while total < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = timeout(LINGER, drain).await;
}

/// Waits for the first bytes of a request without owning a buffer while
/// waiting: each poll reads onto the stack, and only bytes that arrived are
/// copied into a new buffer of `capacity`. `Ok(None)`: the client closed.
async fn first_read(stream: &mut Stream, capacity: usize) -> std::io::Result<Option<BytesMut>> {
    poll_fn(|cx| {
        let mut chunk = [0u8; FIRST_READ_BYTES];
        let mut read = ReadBuf::new(&mut chunk);
        ready!(Pin::new(&mut *stream).poll_read(cx, &mut read))?;
        let got = read.filled();
        if got.is_empty() {
            return Poll::Ready(Ok(None));
        }
        let mut buf = BytesMut::with_capacity(capacity.max(got.len()));
        buf.extend_from_slice(got);
        Poll::Ready(Ok(Some(buf)))
    })
    .await
}

/// Resolves once shutdown has begun (never, if the watch is gone).
async fn shutting_down(mut watch: ShutdownWatch) {
    if watch.wait_for(|down| *down).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Where the request header in `buf` ends (just past its empty line), if it
/// is complete. `scanned` bytes were searched before and held no end.
/// Empty lines before the request line are skipped (RFC 9112 §2.2), and a
/// bare LF ends a line as it does for Pingora's parser.
fn header_end(buf: &[u8], scanned: usize) -> Option<usize> {
    let start = buf.iter().position(|b| !matches!(b, b'\r' | b'\n'))?;
    // An end (`\n\r\n` at most) may begin up to two bytes before `scanned`.
    let mut i = start.max(scanned.saturating_sub(2));
    while let Some(offset) = buf.get(i..)?.iter().position(|&b| b == b'\n') {
        let lf = i + offset;
        match (buf.get(lf + 1), buf.get(lf + 2)) {
            (Some(b'\n'), _) => return Some(lf + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(lf + 3),
            _ => i = lf + 1,
        }
    }
    None
}

#[async_trait]
impl<A> ServerApp for HeaderGate<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            // HTTP/2 has its own framing and timeouts: Pingora's path.
            return ServerApp::process_new(&self.app, stream, shutdown).await;
        }
        let mut fresh = true;
        let mut settings = None;
        // One wait for the connection's life: a wait set up and torn down
        // per request showed in every request's profile.
        let mut shutdown_begun = pin!(shutting_down(shutdown.clone()));
        loop {
            let head = match self
                .read_head(&mut stream, fresh, shutdown_begun.as_mut())
                .await
            {
                Ok(head) => head,
                Err(ending) => {
                    // Boxed: the answer paths stay out of the future every
                    // idle connection holds.
                    Box::pin(self.close(stream, ending)).await;
                    return None;
                }
            };
            let session = self.session(stream, head, settings.take(), shutdown);
            let (next, next_settings) = self
                .app
                .process_new_http(session, shutdown)
                .await?
                .consume();
            stream = next;
            settings = next_settings;
            fresh = false;
        }
    }

    async fn cleanup(&self) {
        // Pingora's proxy wakes requests waiting on a client at shutdown.
        self.app.http_cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use pingora::apps::ReusedHttpStream;
    use pingora::http::ResponseHeader;
    use tokio::io::DuplexStream;

    #[test]
    fn header_end_finds_the_empty_line() {
        let req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody";
        assert_eq!(header_end(req, 0), Some(req.len() - 4));
        assert_eq!(header_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
        assert_eq!(header_end(b"GET / HTTP/1.1\nHost: a\n\n", 0), Some(24));
        assert_eq!(header_end(b"GET / HTTP/1.1\r\nHost: a\r\n\n", 0), Some(26));
        // Leading empty lines are not the end of a header.
        assert_eq!(header_end(b"\r\n\r\n", 0), None);
        assert_eq!(header_end(b"\r\nGET / HTTP/1.1\r\n\r\n", 0), Some(20));
        assert_eq!(header_end(b"", 0), None);
    }

    #[test]
    fn header_end_resumes_across_reads() {
        let req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        // However the bytes were split, the first part holds no end and
        // resuming after it finds the one end.
        for split in 1..req.len() {
            assert_eq!(header_end(&req[..split], 0), None, "split at {split}");
            assert_eq!(header_end(req, split), Some(req.len()), "split at {split}");
        }
    }

    /// A tiny HTTP app: answers `<path> <body bytes>` and keeps the
    /// connection alive, as the proxy does.
    struct Echo;

    #[async_trait]
    impl HttpServerApp for Echo {
        async fn process_new_http(
            self: &Arc<Self>,
            mut session: ServerSession,
            _shutdown: &ShutdownWatch,
        ) -> Option<ReusedHttpStream> {
            if !session.read_request().await.ok()? {
                return None;
            }
            let path = session.req_header().uri.path().to_string();
            let mut body = 0;
            while let Some(chunk) = session.read_request_body().await.ok()? {
                body += chunk.len();
            }
            let text = format!("{path} {body}");
            let mut resp = ResponseHeader::build(200, None).ok()?;
            resp.insert_header("content-length", text.len().to_string())
                .ok()?;
            session.write_response_header(Box::new(resp)).await.ok()?;
            session
                .write_response_body(Bytes::from(text), true)
                .await
                .ok()?;
            let settings = HttpPersistentSettings::for_session(&session);
            let reusable = session.finish().await.ok()??;
            Some(ReusedHttpStream::from_reusable_stream(reusable, settings))
        }
    }

    const LIMITS: GateLimits = GateLimits {
        header_timeout: Duration::from_millis(300),
        keepalive_timeout: Duration::from_millis(400),
        header_buffer_bytes: 16,
        max_header_bytes: 256,
    };

    /// A gate over [`Echo`] serving one in-memory connection; returns the
    /// client's end, the shutdown switch and the gate's task.
    fn serve() -> (
        DuplexStream,
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let gate = Arc::new(HeaderGate::new(Echo, LIMITS));
        let (tx, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            gate.process_new(Box::new(server), &rx).await;
        });
        (client, tx, task)
    }

    /// Reads one response with a `content-length` body.
    async fn response(client: &mut DuplexStream) -> String {
        let mut got = Vec::new();
        let mut chunk = [0u8; 512];
        loop {
            let n = client.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text
                    .to_ascii_lowercase()
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("content-length:")
                            .map(|v| v.trim().to_string())
                    })
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if got.len() >= end + 4 + length {
                    return text;
                }
            }
        }
    }

    async fn until_eof(client: &mut DuplexStream) -> Vec<u8> {
        let mut rest = Vec::new();
        let read = timeout(Duration::from_secs(3), client.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the gate did not close the connection");
        rest
    }

    #[tokio::test]
    async fn a_split_header_with_a_body_is_served_and_the_connection_reused() {
        let (mut client, _tx, _task) = serve();
        for piece in [
            &b"POST /a HTTP/1.1\r\nHo"[..],
            b"st: x\r\nContent-Length: 5\r\n",
            b"\r\nhello",
        ] {
            client.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let first = response(&mut client).await;
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        assert!(
            first.ends_with("/a 5"),
            "body bytes read with the header kept: {first}"
        );
        client
            .write_all(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let second = response(&mut client).await;
        assert!(second.ends_with("/b 0"), "{second}");
    }

    #[tokio::test]
    async fn a_trickled_header_gets_408_at_the_deadline() {
        let (mut client, _tx, task) = serve();
        let started = std::time::Instant::now();
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        // One byte every 100 ms: each read is quick, the header never ends.
        let trickle = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if client.write_all(b"a").await.is_err() {
                    return client;
                }
                if started.elapsed() > Duration::from_millis(600) {
                    return client;
                }
            }
        });
        task.await.unwrap();
        let elapsed = started.elapsed();
        assert!(elapsed >= LIMITS.header_timeout, "{elapsed:?}");
        assert!(elapsed < LIMITS.header_timeout * 2, "{elapsed:?}");
        let mut client = trickle.await.unwrap();
        let answer = String::from_utf8_lossy(&until_eof(&mut client).await).to_string();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("application/problem+json"), "{answer}");
    }

    #[tokio::test]
    async fn a_silent_fresh_connection_is_closed_without_an_answer() {
        let (mut client, _tx, task) = serve();
        let started = std::time::Instant::now();
        task.await.unwrap();
        assert!(started.elapsed() >= LIMITS.header_timeout);
        assert!(until_eof(&mut client).await.is_empty());
    }

    #[tokio::test]
    async fn an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout() {
        let (mut client, _tx, task) = serve();
        client
            .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        response(&mut client).await;
        let idle = std::time::Instant::now();
        task.await.unwrap();
        let elapsed = idle.elapsed();
        assert!(
            elapsed >= LIMITS.keepalive_timeout - Duration::from_millis(20),
            "{elapsed:?}"
        );
        assert!(until_eof(&mut client).await.is_empty());
    }

    #[tokio::test]
    async fn an_oversized_header_gets_431() {
        let (mut client, _tx, _task) = serve();
        let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(300));
        client.write_all(big.as_bytes()).await.unwrap();
        let answer = String::from_utf8_lossy(&until_eof(&mut client).await).to_string();
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    }

    #[tokio::test]
    async fn a_client_leaving_half_way_ends_the_connection_at_once() {
        let (mut client, _tx, task) = serve();
        client.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
        drop(client);
        timeout(Duration::from_millis(200), task)
            .await
            .expect("the gate ends an aborted connection at once")
            .unwrap();
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections() {
        let (mut client, tx, task) = serve();
        tx.send(true).unwrap();
        timeout(Duration::from_millis(200), task)
            .await
            .expect("idle connection closed at shutdown")
            .unwrap();
        assert!(until_eof(&mut client).await.is_empty());
    }
}
