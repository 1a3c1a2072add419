//! The order message: what the gateway publishes for every admitted request
//! and the order workers consume.
//!
//! It is versioned because gateways and workers are deployed independently:
//! a worker refuses (dead-letters) a version it does not know instead of
//! guessing. `message_id` is the admission's request id; it is also the AMQP
//! message id and the idempotency handle through redeliveries.

use serde::{Deserialize, Serialize};

/// The schema version this build writes and understands.
pub const ORDER_MESSAGE_VERSION: u16 = 1;

/// One admitted purchase, waiting to become an order row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderMessage {
    pub version: u16,
    /// The request id returned to the buyer with `202 queued`.
    pub message_id: String,
    pub sale_id: u64,
    pub user_id: u64,
    /// When the gateway admitted it, Unix milliseconds; lets the worker tell
    /// a late message from a released reservation.
    pub admitted_at_ms: i64,
}

/// Why bytes from the queue are not an order message this build can handle.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("order message is not valid JSON for the schema: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error(
        "order message version {0} is not supported (this build reads {ORDER_MESSAGE_VERSION})"
    )]
    UnsupportedVersion(u16),
}

impl OrderMessage {
    pub fn new(message_id: String, sale_id: u64, user_id: u64, admitted_at_ms: i64) -> Self {
        Self {
            version: ORDER_MESSAGE_VERSION,
            message_id,
            sale_id,
            user_id,
            admitted_at_ms,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain integers and strings cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, MessageError> {
        let msg: OrderMessage = serde_json::from_slice(bytes)?;
        if msg.version != ORDER_MESSAGE_VERSION {
            return Err(MessageError::UnsupportedVersion(msg.version));
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let m = OrderMessage::new("r-1".into(), 4, 9, 1_700_000_000_000);
        assert_eq!(OrderMessage::from_json(&m.to_json()).unwrap(), m);
    }

    #[test]
    fn refuses_unknown_versions_and_garbage() {
        let mut m = OrderMessage::new("r".into(), 1, 1, 0);
        m.version = 99;
        assert!(matches!(
            OrderMessage::from_json(&m.to_json()),
            Err(MessageError::UnsupportedVersion(99))
        ));
        assert!(OrderMessage::from_json(b"{not json").is_err());
        assert!(OrderMessage::from_json(br#"{"version":1}"#).is_err());
    }
}
