//! The api's and the worker's fleet reports (see
//! [`seckill_contracts::fleet`]): once a second each says whether it
//! reaches MySQL (and the worker whether its order consumers hold a
//! broker session), and the worker adds its committed orders and their
//! end-to-end latency, for the `/ops` dashboard.

use std::time::Duration;

use seckill_contracts::clock::unix_ms;
use seckill_contracts::fleet::{self, Histogram, MemberReport, Role};
use seckill_contracts::keys::KeySchema;
use seckill_contracts::redis_client::RedisConn;
use sqlx::MySqlPool;

use crate::worker::metrics::METRICS;

/// A MySQL ping slower than this counts as unreachable.
const PING_TIMEOUT: Duration = Duration::from_millis(500);

/// Starts the api's report on a task of its own (it stops with the process).
pub fn spawn_api(redis: RedisConn, keys: KeySchema, db: MySqlPool, port: u16) {
    spawn(Role::Api, redis, keys, db, port, |_| {});
}

/// Starts the worker's report.
pub fn spawn_worker(redis: RedisConn, keys: KeySchema, db: MySqlPool, port: u16) {
    spawn(Role::Worker, redis, keys, db, port, |r| {
        r.health
            .insert("broker".into(), METRICS.consumers_live.get() > 0);
        r.counters
            .insert("orders_committed".into(), METRICS.orders_committed.get());
        r.latency.insert(
            "end_to_end".into(),
            Histogram::of(&METRICS.end_to_end_seconds),
        );
    });
}

/// Reports `role` with its MySQL health, plus what `add` puts in.
fn spawn(
    role: Role,
    redis: RedisConn,
    keys: KeySchema,
    db: MySqlPool,
    port: u16,
    add: fn(&mut MemberReport),
) {
    let id = fleet::host_id(port);
    let started = unix_ms();
    tokio::spawn(fleet::report_forever(redis, keys, move || {
        let (db, id) = (db.clone(), id.clone());
        async move {
            let mut r = MemberReport::new(role, id, started);
            r.health.insert("mysql".into(), mysql_answers(&db).await);
            add(&mut r);
            r
        }
    }));
}

async fn mysql_answers(db: &MySqlPool) -> bool {
    let ping = sqlx::query_scalar::<_, i64>("SELECT 1").fetch_one(db);
    matches!(tokio::time::timeout(PING_TIMEOUT, ping).await, Ok(Ok(1)))
}
