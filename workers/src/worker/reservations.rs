//! Before a batch is written, its reservations are claimed in Redis.
//!
//! The gateway answers 503 and gives the unit back (`lua/shared/release.lua`)
//! when the broker did not confirm a publish in time, yet the broker may
//! still have kept the message. Without a guard that late message would
//! become an order the buyer was told failed, and Redis would count the
//! unit twice (back in stock *and* sold). So, per sale of the batch, one
//! `lua/workers/claim.lua` call atomically
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
use crate::statuses::FailReason;

/// The claim script, shared with the gateway's Redis script folder.
pub const CLAIM_SCRIPT: &str = include_str!("../../../lua/workers/claim.lua");

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

/// Records in MySQL that `request_id` was released, so the buyer's `failed`
/// survives Redis and a later audit can explain the unit that came back.
/// The reason is [`FailReason::Released`], the one the order writer gives
/// a late message for it, so both read alike.
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
    .bind(FailReason::Released)
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
    let json = ResultRecord::failed(FailReason::Released).to_json();
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

/// The Redis server's clock in Unix milliseconds: the clock reservations
/// are stamped with (`admit.lua`), so their age is judged on it too.
pub async fn redis_now_ms<C: ConnectionLike>(redis: &mut C) -> Result<u64, redis::RedisError> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(redis).await?;
    Ok(secs * 1000 + micros / 1000)
}
