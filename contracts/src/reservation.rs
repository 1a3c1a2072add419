//! An admission in flight: the value a sale's reservations hash
//! (`KeySchema.sale(id).reservations()`, field = the buyer's user id) holds
//! from the admission until a worker settles it or it is released, and how
//! long a released request id is remembered.
//!
//! ```text
//! admit.lua    HSET resv <user> "<request_id>:<admitted_ms>"   (Redis clock, ms)
//! claim.lua    "<request_id>:<admitted_ms>:c"                   (a worker has the message)
//! settle.lua   HDEL, when the value is still this request's
//! release.lua  HDEL unless claimed; the request id goes to the released set
//!              for RELEASED_TTL_SECS, so a late message for it is refused
//! ```
//!
//! The scripts under `lua/redis/`, `lua/workers/` and `lua/shared/` write
//! the value; this module is the one reading of it on the Rust side (the
//! sweeper's and the reconciler's).

/// Appended to the value once a worker claimed the reservation: the message
/// arrived and an order is being written, so it may no longer be released.
pub const CLAIMED_SUFFIX: &str = ":c";

/// How long a released request id stays in the sale's released set, so a
/// message arriving that late for it is still refused. Every releaser (the
/// gateway's rollback, the sweeper, the reconciler) passes this.
pub const RELEASED_TTL_SECS: u64 = 24 * 3600;

/// One parsed reservation value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation<'a> {
    /// The admission's request id (the order message's `message_id`).
    pub request_id: &'a str,
    /// When Redis admitted it, in Unix milliseconds of the Redis clock.
    pub admitted_ms: u64,
    /// A worker claimed it ([`CLAIMED_SUFFIX`]).
    pub claimed: bool,
}

/// A reservations-hash value that is not `<request_id>:<admitted_ms>[:c]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a reservation value: {0:?}")]
pub struct MalformedReservation(pub String);

impl<'a> Reservation<'a> {
    /// Reads a value of the reservations hash.
    pub fn parse(value: &'a str) -> Result<Reservation<'a>, MalformedReservation> {
        let malformed = || MalformedReservation(value.to_string());
        let (rest, claimed) = match value.strip_suffix(CLAIMED_SUFFIX) {
            Some(rest) => (rest, true),
            None => (value, false),
        };
        let (request_id, admitted) = rest.rsplit_once(':').ok_or_else(malformed)?;
        if request_id.is_empty() || !admitted.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed());
        }
        Ok(Reservation {
            request_id,
            admitted_ms: admitted.parse().map_err(|_| malformed())?,
            claimed,
        })
    }

    /// The value as the scripts write it.
    pub fn value(&self) -> String {
        let suffix = if self.claimed { CLAIMED_SUFFIX } else { "" };
        format!("{}:{}{suffix}", self.request_id, self.admitted_ms)
    }

    /// Unclaimed and admitted at least `timeout_ms` before `now_ms`: its
    /// message never reached a worker (the sweeper's orphan).
    pub fn is_orphan(&self, now_ms: u64, timeout_ms: u64) -> bool {
        !self.claimed && now_ms.saturating_sub(self.admitted_ms) >= timeout_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_admit_and_claim_write() {
        let held = Reservation::parse("0192-ab:1700000000000").unwrap();
        assert_eq!(
            held,
            Reservation {
                request_id: "0192-ab",
                admitted_ms: 1_700_000_000_000,
                claimed: false,
            }
        );
        let claimed = Reservation::parse("0192-ab:1700000000000:c").unwrap();
        assert!(claimed.claimed);
        assert_eq!(claimed.request_id, "0192-ab");
        assert_eq!(held.value(), "0192-ab:1700000000000");
        assert_eq!(claimed.value(), "0192-ab:1700000000000:c");
    }

    #[test]
    fn refuses_anything_else() {
        for bad in ["garbage", "x:notanumber", ":17", "x:", "x:-1", "x:1:d", ""] {
            assert!(Reservation::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn orphans_are_old_and_unclaimed() {
        let r = Reservation::parse("r:1000").unwrap();
        assert!(!r.is_orphan(1_500, 1_000));
        assert!(r.is_orphan(2_000, 1_000));
        let c = Reservation::parse("r:1000:c").unwrap();
        assert!(!c.is_orphan(10_000, 1_000));
    }
}
