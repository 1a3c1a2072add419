//! The schema migrations under `migrations/`, embedded at build time so every
//! binary (and every test database) migrates to exactly the schema it was
//! built with.

/// Runs with `MIGRATOR.run(&pool)`; sqlx records applied versions in
/// `_sqlx_migrations` so running it again is a no-op.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");
