//! Isolation for integration tests that talk to the real MariaDB, Redis and
//! RabbitMQ.
//!
//! [`TestEnv::new`] creates a fresh database (migrated), names a wallet
//! database of its own (created when a test migrates it), a unique Redis
//! key prefix and unique exchange/queue names, and returns a [`Config`] pointing
//! at them, so tests run in parallel without seeing each other. Dropping the
//! env drops the database, deletes the prefix's keys and the queues, even
//! when the test panicked.
//!
//! Service addresses come from the usual `SECKILL__*` variables when set
//! (`SECKILL__DATABASE__URL` names the server; the database part is replaced).

use std::time::Duration;

use crate::config::Config;
use crate::db::MIGRATOR;
use crate::keys::KeySchema;

/// One test's private slice of the shared services.
pub struct TestEnv {
    /// Unique id, also the database name, key prefix and queue suffix.
    pub id: String,
    pub config: Config,
    server_url: String,
    cleaned: bool,
}

impl TestEnv {
    /// Creates and migrates the database; panics with a clear message when a
    /// service is not reachable (the test cannot run meaningfully without it).
    pub async fn new() -> TestEnv {
        let id = format!("t_{}", uuid::Uuid::new_v4().simple());
        let id = id[..18].to_string();
        let base = Config::load(None).expect("default config with SECKILL__* overrides");
        let server_url = server_part(&base.database.url);
        let mut config = base;
        config.database.url = format!("{server_url}/{id}");
        config.database.max_connections = 8;
        config.redis.key_prefix = id.clone();
        // The wallet's own database, created when a test migrates it.
        config.wallet.database_url = format!("{server_url}/{}", wallet_database(&id));
        let a = &mut config.amqp;
        a.exchange = format!("{id}.orders");
        a.queue = format!("{id}.orders");
        a.dead_letter_exchange = format!("{id}.orders.dlx");
        a.dead_letter_queue = format!("{id}.orders.dlq");
        a.close_delay_queue = format!("{id}.close.delay");
        a.close_queue = format!("{id}.close");
        a.payment_queue = format!("{id}.payments");
        a.refund_queue = format!("{id}.refunds");

        use sqlx::Connection;
        let mut conn = sqlx::MySqlConnection::connect(&format!("{server_url}/mysql"))
            .await
            .expect("MariaDB must be reachable for integration tests (scripts/test starts it)");
        sqlx::query(&format!(
            "CREATE DATABASE `{id}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        ))
        .execute(&mut conn)
        .await
        .expect("create test database");
        conn.close().await.ok();
        let mut conn = sqlx::MySqlConnection::connect(&config.database.url)
            .await
            .expect("connect to test database");
        MIGRATOR
            .run(&mut conn)
            .await
            .expect("migrate test database");
        conn.close().await.ok();

        TestEnv {
            id,
            config,
            server_url,
            cleaned: false,
        }
    }

    /// The Redis key schema of this test.
    pub fn keys(&self) -> KeySchema {
        KeySchema::new(self.config.redis.key_prefix.clone())
    }

    /// A pool on this test's database.
    pub async fn db(&self) -> sqlx::MySqlPool {
        sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(self.config.database.max_connections)
            .connect(&self.config.database.url)
            .await
            .expect("connect to test database")
    }

    /// A Redis connection.
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.config.redis.url.as_str())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("Redis must be reachable for integration tests")
    }

    /// Drops everything this test created. Called by `Drop` too; calling it
    /// explicitly surfaces cleanup errors in the test.
    pub async fn cleanup(mut self) {
        cleanup(&self.id, &self.server_url, &self.config).await;
        self.cleaned = true;
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let (id, server, config) = (
            self.id.clone(),
            self.server_url.clone(),
            self.config.clone(),
        );
        // Drop cannot await, and may run inside a runtime: clean up from a
        // separate thread with its own small runtime and wait for it.
        let handle = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(cleanup(&id, &server, &config));
            }
        });
        let _ = handle.join();
    }
}

/// The name of a test's wallet database.
fn wallet_database(id: &str) -> String {
    format!("{id}_w")
}

async fn cleanup(id: &str, server_url: &str, config: &Config) {
    let deadline = Duration::from_secs(10);
    let _ = tokio::time::timeout(deadline, async {
        use sqlx::Connection;
        if let Ok(mut conn) = sqlx::MySqlConnection::connect(&format!("{server_url}/mysql")).await {
            for db in [id.to_string(), wallet_database(id)] {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS `{db}`"))
                    .execute(&mut conn)
                    .await;
            }
            let _ = conn.close().await;
        }
        if let Ok(client) = redis::Client::open(config.redis.url.as_str()) {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                let pattern = KeySchema::new(id).all_keys_pattern();
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(&pattern)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                for chunk in keys.chunks(500) {
                    let _: Result<(), _> =
                        redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
                }
            }
        }
        let props = lapin::ConnectionProperties::default();
        if let Ok(conn) = lapin::Connection::connect(&config.amqp.url, props).await {
            if let Ok(ch) = conn.create_channel().await {
                let a = &config.amqp;
                for q in [
                    &a.queue,
                    &a.dead_letter_queue,
                    &a.close_delay_queue,
                    &a.close_queue,
                    &a.payment_queue,
                    &a.refund_queue,
                ] {
                    let _ = ch
                        .queue_delete(
                            q.as_str().into(),
                            lapin::options::QueueDeleteOptions::default(),
                        )
                        .await;
                }
                for e in [&a.exchange, &a.dead_letter_exchange] {
                    let _ = ch
                        .exchange_delete(
                            e.as_str().into(),
                            lapin::options::ExchangeDeleteOptions::default(),
                        )
                        .await;
                }
            }
            let _ = conn.close(200, "test cleanup".into()).await;
        }
    })
    .await;
}

/// `mysql://user@host:port/db?x` → `mysql://user@host:port`.
fn server_part(url: &str) -> String {
    let scheme_end = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[scheme_end..].find('/') {
        Some(i) => url[..scheme_end + i].to_string(),
        None => url.split('?').next().unwrap_or(url).to_string(),
    }
}

impl TestEnv {
    /// `SECKILL__*` variables that point a child process (a real binary) at
    /// this test's database, key prefix and queues.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        let c = &self.config;
        let a = &c.amqp;
        [
            ("DATABASE__URL", c.database.url.clone()),
            ("REDIS__URL", c.redis.url.clone()),
            ("REDIS__KEY_PREFIX", c.redis.key_prefix.clone()),
            ("AMQP__URL", a.url.clone()),
            ("AMQP__EXCHANGE", a.exchange.clone()),
            ("AMQP__QUEUE", a.queue.clone()),
            ("AMQP__DEAD_LETTER_EXCHANGE", a.dead_letter_exchange.clone()),
            ("AMQP__DEAD_LETTER_QUEUE", a.dead_letter_queue.clone()),
            ("AMQP__CLOSE_DELAY_QUEUE", a.close_delay_queue.clone()),
            ("AMQP__CLOSE_QUEUE", a.close_queue.clone()),
            ("AMQP__PAYMENT_QUEUE", a.payment_queue.clone()),
            ("AMQP__REFUND_QUEUE", a.refund_queue.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{}{k}", crate::config::ENV_PREFIX), v))
        .collect()
    }
}

/// A loopback address with a port that was free a moment ago, and that
/// this process has not handed out before: the kernel may give a port it
/// just got back to the next `bind(0)`, and two stacks started at once in
/// one test binary would then both be configured with it (one of their
/// processes fails to bind, and both stacks talk to the other's).
pub fn free_addr() -> std::net::SocketAddr {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let addr = listener.local_addr().expect("local addr");
        let mut seen = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.contains(&addr.port()) {
            seen.push(addr.port());
            return addr;
        }
    }
}

/// Polls `url` until it answers 200 or `timeout` passes.
pub async fn wait_ok(url: &str, timeout: Duration) -> bool {
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if let Ok(resp) = client
            .get(url)
            .timeout(Duration::from_millis(500))
            .send()
            .await
        {
            if resp.status().as_u16() == 200 {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A real binary started by a test; killed on drop so a failing test leaves
/// no process behind.
pub struct Process {
    child: std::process::Child,
}

impl Process {
    /// Starts `program` with `args` and extra environment; output goes to
    /// the test's stderr so failures are diagnosable.
    pub fn spawn(program: &str, args: &[&str], envs: &[(String, String)]) -> Process {
        let child = std::process::Command::new(program)
            .args(args)
            .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        Process { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. "TERM", "KILL") with the `kill` utility.
    pub fn signal(&self, signal: &str) {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Waits up to `timeout` for the process to exit; `None` if it did not.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An RS256 key pair generated for a test, with helpers to mint tokens.
///
/// Tests of the JWT path need real signatures from a key the system under
/// test trusts, and must never depend on the developer's `var/keys`. A
/// 2048-bit key takes a while to generate in debug builds, so generate one
/// per test binary (a `OnceLock`) and share it.
#[derive(Debug, Clone)]
pub struct TestKeys {
    /// Key id: the token header's `kid` and the `jwt.public_keys[].kid`.
    pub kid: String,
    /// PKCS#8 PEM (`BEGIN PRIVATE KEY`), as `seckillctl` writes it.
    pub private_pem: String,
    /// SPKI PEM (`BEGIN PUBLIC KEY`), what the gateway is configured with.
    pub public_pem: String,
}

impl TestKeys {
    /// A fresh 2048-bit RSA key pair named `kid` (the size the real keys
    /// have, so the verifier's minimum-size check accepts it).
    pub fn generate(kid: &str) -> TestKeys {
        use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
            .expect("generate a 2048-bit RSA test key");
        let private_pem = key
            .to_pkcs8_pem(LineEnding::LF)
            .expect("encode test private key")
            .to_string();
        let public_pem = key
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("encode test public key");
        TestKeys {
            kid: kid.to_string(),
            private_pem,
            public_pem,
        }
    }

    /// Writes `<dir>/<kid>.public.pem` (the layout `seckillctl` uses) and
    /// returns its path, for a config's `jwt.public_keys`.
    pub fn write_public(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join(format!("{}.public.pem", self.kid));
        std::fs::write(&path, self.public_pem.as_bytes())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// Signs `claims` as an RS256 token whose header carries this key's
    /// `kid`, exactly as the api's signer does.
    pub fn mint(&self, claims: &crate::claims::AccessClaims) -> String {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(self.private_pem.as_bytes())
            .expect("test private key is an RSA PEM");
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &key).expect("sign test token")
    }

    /// Claims for `user_id`: `iat = nbf = now`, `exp = now + ttl_secs`.
    /// A negative `ttl_secs` gives a token that expired that long ago.
    pub fn claims_for(
        user_id: u64,
        issuer: &str,
        audience: &str,
        ttl_secs: i64,
    ) -> crate::claims::AccessClaims {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        crate::claims::AccessClaims {
            sub: user_id.to_string(),
            iss: issuer.to_string(),
            aud: audience.to_string(),
            exp: now.saturating_add_signed(ttl_secs),
            nbf: now,
            iat: now,
            username: format!("user{user_id}"),
        }
    }
}
