//! Reload triggers other than the admin API: a change under the rules
//! folder, and SIGHUP. Runs as a Pingora background service so it starts and
//! stops with the server.
//!
//! File events are debounced: an editor's save is often several writes, and
//! reloading half a file would only produce a refused version and a noisy log.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use notify::{EventKind, RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::RuleEngine;

/// Quiet time after the last file event before reloading.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Watches the rules folder and SIGHUP; reloads the engine on either.
pub struct RuleWatcher {
    engine: Arc<RuleEngine>,
}

impl RuleWatcher {
    pub fn new(engine: Arc<RuleEngine>) -> RuleWatcher {
        RuleWatcher { engine }
    }

    async fn reload(&self, trigger: &'static str) {
        let engine = self.engine.clone();
        // Compiling VMs is CPU work; keep it off the async worker.
        let _ = tokio::task::spawn_blocking(move || engine.reload(trigger)).await;
    }
}

#[async_trait]
impl BackgroundService for RuleWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(event) = res {
                if matches!(
                    event.kind,
                    EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
                ) {
                    let _ = tx.send(());
                }
            }
        });
        let _watcher = match watcher {
            Ok(mut w) => match w.watch(self.engine.dir(), RecursiveMode::Recursive) {
                Ok(()) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the rules folder; reload by SIGHUP or admin API");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "no file watcher; reload by SIGHUP or admin API");
                None
            }
        };
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let hup = async {
                match hangup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hup = std::future::pending::<Option<()>>();
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(()) = rx.recv() => {
                    // Wait for the writes to settle, then reload once.
                    while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
                    self.reload("file").await;
                }
                Some(()) = hup => self.reload("sighup").await,
            }
        }
    }
}
