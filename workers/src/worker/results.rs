//! After a batch committed: the buyers' results go to Redis for polling and
//! their reservations are settled, before the deliveries are acked.
//!
//! Per sale of the batch one `lua/redis/settle.lua` call (one round trip,
//! one hash tag, so it is a single-slot script on Redis Cluster too):
//!
//! * the result key `KeySchema.sale(id).result(user)` gets
//!   `{"status":"success","order_id":"..."}` or
//!   `{"status":"failed","reason":"..."}` with [`RESULT_TTL_SECS`];
//! * the reservation is removed only if it still holds this request id;
//! * a failure gives the reserved unit back to the Redis stock counter and
//!   removes the buyer marker (so the buyer may try again), but only when the
//!   reservation was still this request's, which makes a redelivery harmless;
//! * a `duplicate` keeps the buyer marker (the buyer really has an order),
//!   reports the existing order as the buyer's result, and gives back only
//!   the unit its own reservation took.
//!
//! If Redis fails here the deliveries are not acked; the redelivery finds
//! the batch settled in MySQL and runs this step again.

use std::collections::BTreeMap;

use redis::aio::ConnectionLike;
use seckill_contracts::keys::KeySchema;
use serde::Serialize;

use super::order_writer::{FailReason, Outcome, Settlement};

/// The settle script, shared with the gateway's Redis script folder.
pub const SETTLE_SCRIPT: &str = include_str!("../../../lua/redis/settle.lua");

/// How long a result stays pollable.
pub const RESULT_TTL_SECS: u64 = 24 * 3600;

/// The JSON a buyer's result poll reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ResultRecord {
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub order_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
}

impl ResultRecord {
    /// What the buyer of `outcome` should see, and the settle mode.
    fn of(outcome: &Outcome) -> (ResultRecord, &'static str) {
        match &outcome.settlement {
            Settlement::Success { order_id } => (
                ResultRecord {
                    status: "success".into(),
                    order_id: Some(order_id.clone()),
                    reason: None,
                },
                "success",
            ),
            Settlement::Failed {
                reason,
                existing_order,
            } => {
                if FailReason::parse(reason) == Some(FailReason::Duplicate) {
                    // The buyer has an order; the poll shows it.
                    let record = match existing_order {
                        Some(id) => ResultRecord {
                            status: "success".into(),
                            order_id: Some(id.clone()),
                            reason: None,
                        },
                        None => ResultRecord {
                            status: "failed".into(),
                            order_id: None,
                            reason: Some(reason.clone()),
                        },
                    };
                    (record, "duplicate")
                } else {
                    (
                        ResultRecord {
                            status: "failed".into(),
                            order_id: None,
                            reason: Some(reason.clone()),
                        },
                        "release",
                    )
                }
            }
        }
    }
}

/// Writes the results and settles the reservations of `outcomes`; returns
/// how many units went back to Redis stock counters.
pub async fn publish<C: ConnectionLike>(
    redis: &mut C,
    keys: &KeySchema,
    outcomes: &[Outcome],
) -> Result<u64, redis::RedisError> {
    let mut by_sale: BTreeMap<u64, Vec<&Outcome>> = BTreeMap::new();
    for o in outcomes {
        by_sale.entry(o.message.sale_id).or_default().push(o);
    }
    let script = redis::Script::new(SETTLE_SCRIPT);
    let mut given_back = 0u64;
    for (sale_id, items) in by_sale {
        let k = keys.sale(sale_id);
        let mut inv = script.prepare_invoke();
        inv.key(k.reservations()).key(k.stock()).key(k.buyers());
        inv.arg(RESULT_TTL_SECS);
        for o in &items {
            let (record, mode) = ResultRecord::of(o);
            inv.key(k.result(o.message.user_id));
            inv.arg(o.message.user_id)
                .arg(&o.message.message_id)
                .arg(serde_json::to_string(&record).unwrap_or_default())
                .arg(mode);
        }
        let n: u64 = inv.invoke_async(redis).await?;
        given_back += n;
    }
    Ok(given_back)
}
