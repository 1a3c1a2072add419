//! `pingora-floor [LISTEN] [THREADS]`: the least any Pingora edge costs
//! per request on this machine. A Pingora HTTP proxy app with the
//! gateway's threading (one single-threaded runtime per thread) whose
//! request filter answers every request with an empty 410: no routing, no
//! token, no Lua, no metrics, no logging; and the gateway's allocator, so
//! the difference to the gateway is the gateway's own work. `bench/run
//! openresty` runs it next to nginx `return 410` and the gateway's
//! `/healthz`, so the report shows how much of the gateway's cost per
//! request is Pingora's own; `bench/floors/run` counts the instructions
//! and allocations of the same three.

use async_trait::async_trait;
use pingora::http::ResponseHeader;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::{Error, ErrorType, Result};

// The gateway's allocator (gateway/src/main.rs): Pingora allocates some
// thirty times per request, and glibc malloc would make the floor look
// dearer than the gateway's own Pingora is.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Floor;

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        let mut header = ResponseHeader::build(410, Some(1))?;
        header.insert_header("content-length", "0")?;
        session
            .write_response_header(Box::new(header), true)
            .await?;
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Err(Error::explain(
            ErrorType::InternalError,
            "the floor has no upstream",
        ))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:18192".into());
    let threads = args.next().and_then(|t| t.parse().ok()).unwrap_or(2);
    let conf = ServerConf {
        threads,
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, Floor);
    service.add_tcp(&listen);
    server.add_service(service);
    server.run_forever();
}
