//! Contracts shared by the gateway and the workers.
//!
//! Anything two deployables must agree on lives here and nowhere else:
//! the [`config`] schema every process loads, the Redis [`keys`] schema whose
//! hash tags make one sale one Redis Cluster slot, and the versioned order
//! [`message`] the gateway publishes and the workers consume. With the
//! `testkit` feature it also gives integration tests an isolated database,
//! key prefix and queue names ([`testkit`]).

pub mod admission_answers;
#[cfg(feature = "amqp")]
pub mod amqp_topology;
#[cfg(feature = "amqp")]
pub mod brokers;
pub mod claims;
pub mod cli;
pub mod clock;
pub mod config;
#[cfg(feature = "db")]
pub mod db;
#[cfg(feature = "fleet")]
pub mod fleet;
#[cfg(feature = "jwt")]
pub mod jwks;
#[cfg(feature = "jwt")]
pub mod jwt;
pub mod keys;
pub mod message;
#[cfg(feature = "redis")]
pub mod redis_client;
pub mod reservation;
#[cfg(feature = "rules")]
pub mod rules_bundle;
pub mod sale_events;
pub mod scripts;
pub mod telemetry;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use config::{Config, ConfigError};
pub use keys::{KeySchema, SaleKeys};
pub use message::{OrderMessage, ORDER_MESSAGE_VERSION};

#[cfg(test)]
mod tests {
    /// `cargo test -p seckill-contracts` builds this crate on its own, without
    /// the features the other crates turn on; the crate's dev-dependency on
    /// itself (Cargo.toml) turns on the ones its tests cover, or the JWT
    /// and testkit tests would silently not be compiled at all. Checked at
    /// compile time: without them the tests do not build.
    #[test]
    fn the_tests_build_with_the_features_they_cover() {
        const { assert!(cfg!(feature = "jwt"), "the jwt tests would be skipped") };
        const {
            assert!(
                cfg!(feature = "testkit"),
                "the testkit tests would be skipped"
            )
        };
    }
}
