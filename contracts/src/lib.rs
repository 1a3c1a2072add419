//! Contracts shared by the gateway and the workers.
//!
//! Anything two deployables must agree on lives here and nowhere else:
//! the [`config`] schema every process loads, the Redis [`keys`] schema whose
//! hash tags make one sale one Redis Cluster slot, and the versioned order
//! [`message`] the gateway publishes and the workers consume. With the
//! `testkit` feature it also gives integration tests an isolated database,
//! key prefix and queue names ([`testkit`]).

#[cfg(feature = "amqp")]
pub mod amqp_topology;
pub mod claims;
pub mod cli;
pub mod config;
#[cfg(feature = "db")]
pub mod db;
#[cfg(feature = "jwt")]
pub mod jwt;
pub mod keys;
pub mod message;
#[cfg(feature = "redis")]
pub mod redis_client;
pub mod sale_events;
pub mod telemetry;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use config::{Config, ConfigError};
pub use keys::{KeySchema, SaleKeys};
pub use message::{OrderMessage, ORDER_MESSAGE_VERSION};
