//! Shared helpers of the worker integration tests (included by the
//! `worker_*.rs` test files with `#[path]`; as a test target of its own it
//! has no tests).
#![allow(dead_code)]

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use seckill_contracts::amqp_topology;
use seckill_contracts::config::Config;
use seckill_contracts::testkit::TestEnv;
use seckill_contracts::OrderMessage;
use seckill_workers::sales::{self, NewSale, Sale};
use sqlx::MySqlPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A sale that is active now with `stock` units at 990 cents.
pub async fn create_sale(env: &TestEnv, db: &MySqlPool, stock: u32) -> Sale {
    let mut redis = env.redis().await;
    let now = chrono::Utc::now();
    sales::create(
        db,
        &mut redis,
        &env.keys(),
        &NewSale {
            title: "test goods".into(),
            price_cents: 1990,
            sale_price_cents: 990,
            stock,
            starts_at: now - chrono::Duration::minutes(1),
            ends_at: now + chrono::Duration::hours(1),
        },
    )
    .await
    .expect("create sale")
}

/// A confirm-mode channel with the topology declared.
pub async fn channel(config: &Config) -> (Connection, Channel) {
    let conn = Connection::connect(&config.amqp.url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ reachable");
    let ch = conn.create_channel().await.expect("channel");
    amqp_topology::declare(
        &ch,
        &config.amqp,
        amqp_topology::close_delay_ms(&config.worker),
    )
    .await
    .expect("declare topology");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm select");
    (conn, ch)
}

/// Publishes raw bodies as the gateway does (persistent, mandatory, message
/// id) and waits for every confirm.
pub async fn publish_raw(config: &Config, bodies: &[(String, Vec<u8>)]) {
    let (conn, ch) = channel(config).await;
    let mut confirms = Vec::with_capacity(bodies.len());
    for (id, body) in bodies {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(id.as_str().into());
        let confirm = ch
            .basic_publish(
                config.amqp.exchange.as_str().into(),
                amqp_topology::order_routing_key(&config.amqp).into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                props,
            )
            .await
            .expect("publish");
        confirms.push(confirm);
    }
    for c in confirms {
        let confirmation = c.await.expect("confirm");
        assert!(confirmation.is_ack(), "broker refused a test message");
    }
    let _ = conn.close(200, "test publisher done".into()).await;
}

/// Publishes order messages.
pub async fn publish(config: &Config, messages: &[OrderMessage]) {
    let bodies: Vec<(String, Vec<u8>)> = messages
        .iter()
        .map(|m| (m.message_id.clone(), m.to_json()))
        .collect();
    publish_raw(config, &bodies).await;
}

/// An order message for `user` in `sale`, admitted now.
pub fn message(id: impl Into<String>, sale: u64, user: u64) -> OrderMessage {
    OrderMessage::new(id.into(), sale, user, chrono::Utc::now().timestamp_millis())
}

/// Messages waiting in `queue` (not counting unacked ones).
pub async fn queue_depth(config: &Config, queue: &str) -> u32 {
    let conn = Connection::connect(&config.amqp.url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ reachable");
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare");
    let _ = conn.close(200, "depth read".into()).await;
    q.message_count()
}

/// An in-process worker; `stop` shuts it down gracefully.
pub struct InProcessWorker {
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl InProcessWorker {
    pub async fn start(config: &Config) -> InProcessWorker {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind probes");
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(seckill_workers::worker::run(
            config.clone(),
            listener,
            async move {
                let _ = rx.await;
            },
        ));
        InProcessWorker {
            stop: Some(tx),
            handle,
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let res = tokio::time::timeout(Duration::from_secs(30), &mut self.handle)
            .await
            .expect("worker stops within 30 s")
            .expect("worker task");
        res.expect("worker ran cleanly");
    }
}

/// Polls `check` every 100 ms until it returns true or `timeout` passes.
pub async fn wait_for<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn count(db: &MySqlPool, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(db)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Orders plus failed admissions: messages settled in MySQL.
pub async fn settled(db: &MySqlPool) -> i64 {
    count(db, "SELECT COUNT(*) FROM orders").await
        + count(db, "SELECT COUNT(*) FROM failed_admissions").await
}

pub async fn stock_left(db: &MySqlPool, sale: u64) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT CAST(stock_left AS SIGNED) FROM sales WHERE id = ?")
        .bind(sale)
        .fetch_one(db)
        .await
        .expect("stock_left")
}

/// The service and admin tokens of the in-process wallet.
pub const SERVICE_TOKEN: &str = "test-service-token";
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// A wallet service in-process on its own port and the test's own wallet
/// database (migrated), and `config` pointed at it: `payment.wallet_urls`,
/// the service and admin tokens. `stop` ends it (the wallet "goes down").
pub struct InProcessWallet {
    pub config: Config,
    pub url: String,
    pub db: MySqlPool,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<std::io::Result<()>>,
}

impl InProcessWallet {
    pub async fn start(config: &Config) -> InProcessWallet {
        let mut config = config.clone();
        config.payment.service_token = Some(SERVICE_TOKEN.into());
        config.payment.service_token_path = None;
        config.api.admin_token = Some(ADMIN_TOKEN.into());
        config.api.admin_token_path = None;
        seckill_workers::wallet::migrate(&config)
            .await
            .expect("migrate the wallet database");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the wallet");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        config.payment.wallet_urls = vec![url.clone()];
        Self::serve(config, url, listener).await
    }

    /// Serves again on the same address after [`stop`](Self::stop).
    pub async fn restart(config: &Config, url: &str) -> InProcessWallet {
        let addr = url.trim_start_matches("http://");
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("rebind the wallet");
        Self::serve(config.clone(), url.to_string(), listener).await
    }

    async fn serve(
        config: Config,
        url: String,
        listener: tokio::net::TcpListener,
    ) -> InProcessWallet {
        let state = seckill_workers::wallet::WalletState::connect(&config)
            .await
            .expect("wallet state");
        let db = state.db().clone();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(seckill_workers::wallet::serve(
            state,
            listener,
            async move {
                let _ = rx.await;
            },
        ));
        InProcessWallet {
            config,
            url,
            db,
            stop: Some(tx),
            handle,
        }
    }

    /// Tops `users` up with `cents` each (through the admin route).
    pub async fn credit(&self, users: &[u64], cents: i64) {
        let client = seckill_workers::payments::wallet_client::WalletClient::new(&self.config);
        for &user in users {
            client
                .credit(ADMIN_TOKEN, user, cents)
                .await
                .unwrap_or_else(|e| panic!("credit {user}: {e}"));
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.handle).await;
    }
}
