//! Opening the stores from configuration, with the timeouts and pool sizes
//! the config names, so every binary and test connects the same way.

use std::time::Duration;

use seckill_contracts::config::{Config, DatabaseConfig};
use seckill_contracts::db::MIGRATOR;
use seckill_contracts::redis_client::RedisConn;
use sqlx::mysql::MySqlPoolOptions;
use sqlx::MySqlPool;

/// Failure to reach a store at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("MySQL at {url}: {source}")]
    Database { url: String, source: sqlx::Error },
    #[error("migrating MySQL: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("Redis at {url}: {source}")]
    Redis {
        url: String,
        source: redis::RedisError,
    },
}

/// A MySQL pool per `database` config; every connection gets the idle
/// transaction timeout ([`DatabaseConfig::idle_transaction_timeout_secs`]).
pub async fn mysql(config: &DatabaseConfig) -> Result<MySqlPool, ConnectError> {
    let idle = config.idle_transaction_timeout_secs;
    MySqlPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_millis(config.acquire_timeout_ms))
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if idle > 0 {
                    set_idle_transaction_timeout(conn, idle).await;
                }
                Ok(())
            })
        })
        .connect(&config.url)
        .await
        .map_err(|source| ConnectError::Database {
            url: redact(&config.url),
            source,
        })
}

/// `SET SESSION idle_transaction_timeout`; a server without the variable
/// (MySQL) keeps its own behaviour, which is said once per connection at
/// debug level rather than failing the connection.
async fn set_idle_transaction_timeout(conn: &mut sqlx::MySqlConnection, secs: u64) {
    let set = format!("SET SESSION idle_transaction_timeout = {secs}");
    if let Err(e) = sqlx::query(&set).execute(conn).await {
        tracing::debug!(error = %e, "no idle_transaction_timeout on this server");
    }
}

/// Creates the database if needed and applies pending migrations.
pub async fn migrate(config: &DatabaseConfig) -> Result<(), ConnectError> {
    use sqlx::migrate::MigrateDatabase;
    if !sqlx::MySql::database_exists(&config.url)
        .await
        .unwrap_or(false)
    {
        sqlx::MySql::create_database(&config.url)
            .await
            .map_err(|source| ConnectError::Database {
                url: redact(&config.url),
                source,
            })?;
    }
    let pool = mysql(config).await?;
    MIGRATOR.run(&pool).await?;
    pool.close().await;
    Ok(())
}

/// The Redis handle (single node or cluster).
pub async fn redis(config: &Config) -> Result<RedisConn, ConnectError> {
    RedisConn::connect(&config.redis)
        .await
        .map_err(|source| ConnectError::Redis {
            url: redact(&config.redis.url),
            source,
        })
}

/// Hides a password in a URL before it is logged.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    match (rest.find('@'), rest.find(':')) {
        (Some(at), Some(colon)) if colon < at => {
            format!(
                "{}{}:***{}",
                &url[..scheme_end],
                &rest[..colon],
                &rest[at..]
            )
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact("mysql://root:pw@h:3306/db"),
            "mysql://root:***@h:3306/db"
        );
        assert_eq!(redact("mysql://root@h:3306/db"), "mysql://root@h:3306/db");
        assert_eq!(redact("redis://h:6379/"), "redis://h:6379/");
    }
}
