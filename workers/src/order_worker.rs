//! The order worker process: consumes admitted orders from RabbitMQ and
//! writes them to MySQL.
//!
//! [`run`] serves the probes on `listener` until `shutdown` resolves, so
//! `scripts/up` and the gateway-side health checks can watch the process.

use std::future::Future;

use tokio::net::TcpListener;

use crate::probes;

/// Runs until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tracing::info!(addr = ?listener.local_addr().ok(), "worker probes listening");
    axum::serve(listener, probes::router::<()>())
        .with_graceful_shutdown(shutdown)
        .await
}
