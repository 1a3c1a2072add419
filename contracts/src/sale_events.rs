//! Sale change notices on Redis pub/sub, so every gateway keeps its local
//! copy of a sale and its local sold-out mark in step without asking Redis
//! on every request.
//!
//! Whoever changes a sale's hot state publishes one [`SaleEvent`] (JSON) on
//! [`KeySchema::sale_events_channel`]: the api and `seckillctl` after a
//! create or warm-up (`updated`), a gateway that saw the stock reach zero
//! (`sold_out`), a gateway rollback or a worker returning stock (`reopened`).
//! Pub/sub may drop a notice (a gateway reconnecting), so receivers also
//! age their copies out by themselves: a notice makes a change visible at
//! once, the TTL bounds how long a missed one can matter.
//!
//! [`KeySchema::sale_events_channel`]: crate::keys::KeySchema::sale_events_channel

use serde::{Deserialize, Serialize};

/// What happened to a sale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SaleEventKind {
    /// Its info or stock was (re)written: drop the local copy.
    Updated,
    /// Its Redis stock reached zero: set the local sold-out mark.
    SoldOut,
    /// Stock came back (a rollback, a cancel, a timeout close): clear the mark.
    Reopened,
}

impl SaleEventKind {
    pub fn parse(s: &str) -> Option<SaleEventKind> {
        match s {
            "updated" => Some(SaleEventKind::Updated),
            "sold_out" => Some(SaleEventKind::SoldOut),
            "reopened" => Some(SaleEventKind::Reopened),
            _ => None,
        }
    }
}

/// One notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaleEvent {
    pub sale_id: u64,
    pub kind: SaleEventKind,
}

impl SaleEvent {
    pub fn to_json(&self) -> String {
        // A struct of an integer and a unit enum always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// `None` for anything that is not a notice of this schema.
    pub fn from_json(payload: &[u8]) -> Option<SaleEvent> {
        serde_json::from_slice(payload).ok()
    }
}

/// Publishes `event` on the sale events channel of `keys`.
#[cfg(feature = "redis")]
pub async fn publish<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    keys: &crate::keys::KeySchema,
    event: SaleEvent,
) -> redis::RedisResult<()> {
    redis::cmd("PUBLISH")
        .arg(keys.sale_events_channel())
        .arg(event.to_json())
        .query_async::<i64>(conn)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let e = SaleEvent {
            sale_id: 42,
            kind: SaleEventKind::SoldOut,
        };
        assert_eq!(e.to_json(), r#"{"sale_id":42,"kind":"sold_out"}"#);
        assert_eq!(SaleEvent::from_json(e.to_json().as_bytes()), Some(e));
        assert_eq!(
            SaleEvent::from_json(b"{\"sale_id\":-1,\"kind\":\"sold_out\"}"),
            None
        );
        assert_eq!(
            SaleEvent::from_json(b"{\"sale_id\":1,\"kind\":\"boom\"}"),
            None
        );
        assert_eq!(SaleEvent::from_json(b"not json"), None);
        assert_eq!(
            SaleEventKind::parse("reopened"),
            Some(SaleEventKind::Reopened)
        );
    }
}
