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
use seckill_contracts::keys::KeySchema;
use seckill_contracts::OrderMessage;

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
