//! The edge gateway: a Pingora proxy in front of the api pool that verifies
//! JWTs, runs the hot-reloadable Lua rules and admits flash-sale requests.
//!
//! Modules follow the request: [`header_gate`] lets a connection through
//! once it has sent a whole header in time, [`routes`] picks a route,
//! [`proxy`] runs the lifecycle, [`pools`] chooses a healthy backend, [`problem`] writes local
//! answers, [`metrics`] counts, [`admin`] exposes it all to operators, and
//! [`server`] assembles the Pingora services from configuration.

pub mod admin;
pub mod decisions;
pub mod drain;
pub mod fleet_report;
pub mod handoff;
pub mod header_gate;
pub mod key_refresh;
pub mod limiter;
pub mod metrics;
pub mod micro_cache;
pub mod pools;
pub mod problem;
pub mod proxy;
pub mod publisher;
pub mod redis_scripts;
pub mod routes;
pub mod rules;
pub mod sale_directory;
pub mod server;
pub mod services;
pub mod shared_dict;
pub mod web_files;

/// RS256 verification lives in the shared crate (the api verifies too).
pub use seckill_contracts::jwt;
pub use server::{Gateway, GatewayError};
