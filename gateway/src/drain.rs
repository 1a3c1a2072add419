//! Draining: once shutdown (SIGTERM) or the hand-over of a graceful upgrade
//! (SIGQUIT) begins, every response tells the client `Connection: close`.
//!
//! Without it a client keeps sending on its keep-alive connection to the old
//! process until that process closes the socket under a request in flight;
//! with it the client's next request opens a new connection, which lands on
//! the new process (upgrade) or another gateway behind the VIP (shutdown).

use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

static DRAINING: AtomicBool = AtomicBool::new(false);

/// Whether this process is shutting down.
pub fn is_draining() -> bool {
    DRAINING.load(Ordering::Relaxed)
}

/// A background service that flips [`is_draining`] when Pingora broadcasts
/// shutdown.
pub struct DrainWatch;

#[async_trait]
impl BackgroundService for DrainWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
        DRAINING.store(true, Ordering::Relaxed);
        tracing::info!("draining: responses now close their connections");
    }
}
