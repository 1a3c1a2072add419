//! Connecting to RabbitMQ when there is more than one node to try.
//!
//! `amqp.url` is the broker every component connects to first;
//! `amqp.failover_urls` are the other nodes of the same cluster. A
//! connection attempt goes through the list in turn, starting with the
//! node that answered last (sticky, so a fleet that failed over stays on
//! the node that works instead of knocking on the dead one first at every
//! reconnect), and gives the last error when none answers. The publisher,
//! the consumers, the closer, the DLQ tools and the ops routes all connect
//! through [`connect`], and each already reconnects on a lost connection:
//! with several nodes, that reconnect is the failover.

use std::sync::atomic::{AtomicUsize, Ordering};

use lapin::{Connection, ConnectionProperties};

use crate::config::{redacted_url as redacted, AmqpConfig};

/// Index (in [`AmqpConfig::broker_urls`]) of the node the process last
/// connected to.
static LAST_GOOD: AtomicUsize = AtomicUsize::new(0);

/// Connects to the first node of the list that answers, starting with the
/// one that answered last. Returns the connection and the node's index.
pub async fn connect(
    config: &AmqpConfig,
    properties: ConnectionProperties,
) -> lapin::Result<(Connection, usize)> {
    let urls = config.broker_urls();
    let start = LAST_GOOD.load(Ordering::Relaxed) % urls.len();
    let mut last_error = None;
    for i in (0..urls.len()).map(|k| (start + k) % urls.len()) {
        match Connection::connect(urls[i], properties.clone()).await {
            Ok(connection) => {
                if i != start {
                    tracing::warn!(broker = %redacted(urls[i]), "connected to a failover broker");
                }
                LAST_GOOD.store(i, Ordering::Relaxed);
                return Ok((connection, i));
            }
            Err(e) => {
                tracing::warn!(broker = %redacted(urls[i]), error = %e, "broker unreachable");
                last_error = Some(e);
            }
        }
    }
    // The list is never empty (`url` is first), so there is an error.
    Err(last_error.unwrap_or_else(|| {
        lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed).into()
    }))
}
