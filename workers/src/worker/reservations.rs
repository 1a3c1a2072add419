//! Before a batch is written, its reservations are claimed in Redis.
//!
//! The gateway answers 503 and gives the unit back (`lua/redis/release.lua`)
//! when the broker did not confirm a publish in time, yet the broker may
//! still have kept the message. Without a guard that late message would
//! become an order the buyer was told failed, and Redis would count the
//! unit twice (back in stock *and* sold). So, per sale of the batch, one
//! `lua/redis/claim.lua` call atomically
//!
//! * marks each still-held reservation as claimed (`":c"`), after which a
//!   rollback refuses (`-1`) and the gateway answers 202 instead, and
//! * reports the request ids already released: those messages settle as
//!   `released` without touching stock.
//!
//! A reservation that is simply absent (settled before, or Redis lost the
//! sale's state) is not refused: MySQL's guards decide, so a Redis restart
//! never loses an admitted order.

use std::collections::{BTreeMap, HashSet};

use redis::aio::ConnectionLike;
use seckill_contracts::keys::{KeySchema, SaleKeys};
use seckill_contracts::OrderMessage;

use super::results::{ResultRecord, RESULT_TTL_SECS};

/// The claim script, shared with the gateway's Redis script folder.
pub const CLAIM_SCRIPT: &str = include_str!("../../../lua/redis/claim.lua");

/// Claims the reservations of `messages`; returns the ids of the messages
/// whose reservation was released before they arrived.
pub async fn claim<C: ConnectionLike>(
    redis: &mut C,
    keys: &KeySchema,
    messages: &[OrderMessage],
) -> Result<HashSet<String>, redis::RedisError> {
    let mut by_sale: BTreeMap<u64, Vec<&OrderMessage>> = BTreeMap::new();
    for m in messages {
        by_sale.entry(m.sale_id).or_default().push(m);
    }
    let script = redis::Script::new(CLAIM_SCRIPT);
    let mut released = HashSet::new();
    for (sale_id, items) in by_sale {
        let k = keys.sale(sale_id);
        let mut inv = script.prepare_invoke();
        inv.key(k.reservations()).key(k.released());
        for m in &items {
            inv.arg(m.user_id).arg(&m.message_id);
        }
        let flags: Vec<i64> = inv.invoke_async(redis).await?;
        for (m, flag) in items.iter().zip(flags) {
            if flag == 0 {
                released.insert(m.message_id.clone());
            }
        }
    }
    Ok(released)
}

/// How long a released request id is remembered, so a message arriving
/// late for it is refused (the gateway's rollback uses the same span).
pub const RELEASED_TTL_SECS: u64 = 24 * 3600;

/// The reason recorded for a reservation released because its message
/// never came; the order writer records a late message for one the same
/// way, so both read alike.
pub const RELEASED_REASON: &str = "released";

/// Records in MySQL that `request_id` was released, so the buyer's `failed`
/// survives Redis and a later audit can explain the unit that came back.
pub async fn record_released<'e, E: sqlx::MySqlExecutor<'e>>(
    db: E,
    request_id: &str,
    user_id: u64,
    sale_id: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT IGNORE INTO failed_admissions (request_id, user_id, sale_id, reason) \
         VALUES (?, ?, ?, ?)",
    )
    .bind(request_id)
    .bind(user_id)
    .bind(sale_id)
    .bind(RELEASED_REASON)
    .execute(db)
    .await?;
    Ok(())
}

/// Tells the polling buyer their released admission `failed`. `NX`: a
/// result already there (written by a worker that did get the message) is
/// never overwritten.
pub async fn publish_released_result<C: ConnectionLike>(
    redis: &mut C,
    keys: &SaleKeys,
    user_id: u64,
) -> Result<(), redis::RedisError> {
    let record = ResultRecord {
        status: "failed".into(),
        order_id: None,
        reason: Some(RELEASED_REASON.into()),
    };
    let json = serde_json::to_string(&record).unwrap_or_default();
    let _: Option<String> = redis::cmd("SET")
        .arg(keys.result(user_id))
        .arg(json)
        .arg("EX")
        .arg(RESULT_TTL_SECS)
        .arg("NX")
        .query_async(redis)
        .await?;
    Ok(())
}
