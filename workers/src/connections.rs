//! Opening the stores from configuration, with the timeouts and pool sizes
//! the config names, so every binary and test connects the same way.

use std::net::SocketAddr;
use std::time::Duration;

use seckill_contracts::config::{Config, DatabaseConfig};
use seckill_contracts::db::MIGRATOR;
use seckill_contracts::redis_client::RedisConn;
use sqlx::mysql::MySqlPoolOptions;
use sqlx::MySqlPool;
use tokio::net::{TcpListener, TcpSocket};

/// Failure to reach a store at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("MySQL at {url}: {source}")]
    Database { url: String, source: sqlx::Error },
    #[error("migrating MySQL: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("another process kept migrating the database for over {0} s")]
    MigrationLock(i64),
    #[error("Redis at {url}: {source}")]
    Redis {
        url: String,
        source: redis::RedisError,
    },
}

/// The listening socket of a service at `addr`, with room for `backlog`
/// connections the service has not accepted yet (the kernel caps it at
/// `net.core.somaxconn`). Tokio's own `bind` queues 1,024, fewer than a
/// burst of buyers opens at once against a busy instance; the ones that do
/// not fit are dropped and retried by the client a second later.
pub fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
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
    migrate_with(config, &MIGRATOR).await
}

/// Creates the database `config` names if needed and applies `migrator`
/// (the order database's, or the wallet's).
pub async fn migrate_with(
    config: &DatabaseConfig,
    migrator: &sqlx::migrate::Migrator,
) -> Result<(), ConnectError> {
    use sqlx::migrate::MigrateDatabase;
    let database_error = |source| ConnectError::Database {
        url: redact(&config.url),
        source,
    };
    if !sqlx::MySql::database_exists(&config.url)
        .await
        .unwrap_or(false)
    {
        // Another instance starting at the same moment may create it first.
        if let Err(e) = sqlx::MySql::create_database(&config.url).await {
            if !sqlx::MySql::database_exists(&config.url)
                .await
                .unwrap_or(false)
            {
                return Err(database_error(e));
            }
        }
    }
    let pool = mysql(config).await?;
    let mut conn = pool.acquire().await.map_err(database_error)?;
    // sqlx's own migration lock asks for GET_LOCK(name, -1), which MariaDB
    // answers with NULL and no lock: two instances starting together (two
    // wallets) then ran the same migration at once and left it "partially
    // applied". This lock holds on MariaDB and MySQL alike.
    let locked: Option<i64> =
        sqlx::query_scalar("SELECT GET_LOCK(CONCAT('seckill-migrate:', DATABASE()), ?)")
            .bind(MIGRATE_LOCK_WAIT_SECS)
            .fetch_one(&mut *conn)
            .await
            .map_err(database_error)?;
    if locked != Some(1) {
        return Err(ConnectError::MigrationLock(MIGRATE_LOCK_WAIT_SECS));
    }
    let ran = migrator.run(&mut *conn).await;
    let _ = sqlx::query("SELECT RELEASE_LOCK(CONCAT('seckill-migrate:', DATABASE()))")
        .execute(&mut *conn)
        .await;
    drop(conn);
    pool.close().await;
    Ok(ran?)
}

/// How long a migration waits for another process's migration of the same
/// database to finish.
const MIGRATE_LOCK_WAIT_SECS: i64 = 120;

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

    /// Connections the kernel completes for a listener that accepts none:
    /// its backlog (plus one), whatever tokio's default would be.
    async fn queued_without_accepting(backlog: u32, attempts: usize) -> usize {
        let listener = super::listen(([127, 0, 0, 1], 0).into(), backlog).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut open = Vec::new();
        for _ in 0..attempts {
            let connect = tokio::net::TcpStream::connect(addr);
            match tokio::time::timeout(std::time::Duration::from_millis(300), connect).await {
                Ok(Ok(stream)) => open.push(stream),
                _ => break,
            }
        }
        open.len()
    }

    #[tokio::test]
    async fn a_listener_queues_as_many_connections_as_its_backlog_says() {
        let small = queued_without_accepting(4, 20).await;
        assert!((4..=6).contains(&small), "backlog 4 queued {small}");
        // (tokio's own bind would have queued all 20 above.)
        let larger = queued_without_accepting(64, 50).await;
        assert_eq!(larger, 50, "backlog 64 queued {larger}");
    }
}
