//! Redis scripts that more than one deployable runs, compiled into each.
//!
//! A script both the gateway and the workers call must be the same text in
//! both, or one side's idea of a reservation drifts from the other's. It is
//! owned here, once: each side builds its `redis::Script` from these
//! constants, so both send the same SHA to Redis.

/// Gives back an admission that will not become an order: the gateway's
/// rollback after a failed publish, and the workers' sweep of reservations
/// whose message never arrived. Arguments and replies are documented in
/// the script itself (`lua/shared/release.lua`).
pub const RELEASE: &str = include_str!("../../lua/shared/release.lua");

/// Names (file stems) of the scripts above. A gateway's rules folder may
/// not bring its own script of one of these names: it would look editable
/// there while every process keeps running the compiled-in text.
pub const SHARED_NAMES: [&str; 1] = ["release"];

/// `release.lua`'s replies.
pub mod release_reply {
    /// The unit is back in stock and the request id is remembered.
    pub const RELEASED: i64 = 1;
    /// The reservation is not this request's (settled, released, too young).
    pub const NOT_HELD: i64 = 0;
    /// A worker has claimed it: the message arrived, the admission stands.
    pub const CLAIMED: i64 = -1;
}
