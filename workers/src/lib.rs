//! The back half of the platform: the api service, the order workers, the
//! wallet service (`wallet`, with its own database) and the `seckillctl`
//! ops CLI. Binaries under `src/bin` only parse flags and call
//! into these modules, which tests call directly.

pub mod api;
pub mod audit;
pub mod connections;
pub mod demo;
pub mod fleet_report;
pub mod group_commit;
pub mod keyring;
pub mod lock;
pub mod orders;
pub mod outbox;
pub mod payments;
pub mod probes;
pub mod reconcile;
pub mod rules_rollout;
pub mod sales;
pub mod shutdown;
pub mod signing_keys;
pub mod statuses;
pub mod tokens;
pub mod wallet;
pub mod worker;
