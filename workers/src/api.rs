//! The api service: the HTTP backend the gateway load-balances to.
//!
//! [`serve`] takes an already-bound listener and a shutdown future so tests
//! run it in-process on port 0 and binaries run it on the configured port.
//! Requests flow gateway → here → MySQL/Redis; this module only assembles
//! the router and owns the server lifecycle.

use std::future::Future;

use axum::Router;
use tokio::net::TcpListener;

use crate::probes;

/// Serves the api on `listener` until `shutdown` resolves, then drains
/// in-flight requests.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app: Router = probes::router();
    tracing::info!(addr = ?listener.local_addr().ok(), "api listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
