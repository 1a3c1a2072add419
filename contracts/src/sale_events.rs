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
    /// The wire name (as in the JSON and `seckill.sale_event`).
    pub fn as_str(self) -> &'static str {
        match self {
            SaleEventKind::Updated => "updated",
            SaleEventKind::SoldOut => "sold_out",
            SaleEventKind::Reopened => "reopened",
        }
    }

    pub fn parse(s: &str) -> Option<SaleEventKind> {
        [
            SaleEventKind::Updated,
            SaleEventKind::SoldOut,
            SaleEventKind::Reopened,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == s)
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

/// A notice as it travels: the event plus when it was published (ms since
/// the epoch), so a receiver can tell how long notices take to reach it
/// (`gateway_sale_event_delay_seconds`). A notice without the stamp (an
/// older publisher) is still a notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamped {
    #[serde(flatten)]
    pub event: SaleEvent,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_at_ms: Option<u64>,
}

impl Stamped {
    /// `event`, stamped now.
    pub fn now(event: SaleEvent) -> Stamped {
        Stamped {
            event,
            published_at_ms: Some(crate::clock::unix_ms()),
        }
    }

    pub fn to_json(&self) -> String {
        // Integers and a unit enum always serialize.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// `None` for anything that is not a notice of this schema.
    pub fn from_json(payload: &[u8]) -> Option<Stamped> {
        serde_json::from_slice(payload).ok()
    }
}

/// Publishes `event`, stamped now, on the sale events channel of `keys`.
#[cfg(feature = "redis")]
pub async fn publish<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    keys: &crate::keys::KeySchema,
    event: SaleEvent,
) -> redis::RedisResult<()> {
    publish_stamped(conn, keys, Stamped::now(event)).await
}

/// Publishes a notice stamped earlier (when it was announced, so the time
/// it waited to be sent counts in its delay).
#[cfg(feature = "redis")]
pub async fn publish_stamped<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    keys: &crate::keys::KeySchema,
    notice: Stamped,
) -> redis::RedisResult<()> {
    redis::cmd("PUBLISH")
        .arg(keys.sale_events_channel())
        .arg(notice.to_json())
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
        assert_eq!(Stamped::from_json(b"{\"sale_id\":1}"), None);
        assert_eq!(
            SaleEventKind::parse("reopened"),
            Some(SaleEventKind::Reopened)
        );
    }

    #[test]
    fn wire_names_are_the_json_names() {
        for kind in [
            SaleEventKind::Updated,
            SaleEventKind::SoldOut,
            SaleEventKind::Reopened,
        ] {
            assert_eq!(
                serde_json::to_string(&kind).unwrap(),
                format!("\"{}\"", kind.as_str())
            );
            assert_eq!(SaleEventKind::parse(kind.as_str()), Some(kind));
        }
    }

    #[test]
    fn stamped_notices_carry_their_publish_time_and_unstamped_ones_still_parse() {
        let event = SaleEvent {
            sale_id: 7,
            kind: SaleEventKind::Reopened,
        };
        let stamped = Stamped {
            event,
            published_at_ms: Some(1_700_000_000_123),
        };
        assert_eq!(
            stamped.to_json(),
            r#"{"sale_id":7,"kind":"reopened","published_at_ms":1700000000123}"#
        );
        assert_eq!(
            Stamped::from_json(stamped.to_json().as_bytes()),
            Some(stamped)
        );
        // An older publisher's notice, and an older receiver reading a new one.
        let plain = Stamped::from_json(event.to_json().as_bytes()).unwrap();
        assert_eq!((plain.event, plain.published_at_ms), (event, None));
        assert_eq!(
            SaleEvent::from_json(stamped.to_json().as_bytes()),
            Some(event)
        );
    }
}
