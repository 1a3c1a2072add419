//! After a batch committed: the buyers' results go to Redis for polling and
//! their reservations are settled, before the deliveries are acked.
//!
//! Per sale of the batch one `lua/workers/settle.lua` call (one round trip,
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
//!   the unit its own reservation took;
//! * an order this batch wrote whose admission Redis no longer knows (no
//!   reservation, no buyer marker: a failover lost admit.lua's writes, or
//!   a rebuild from MySQL came before this order) takes its unit from the
//!   counter now, so Redis stock + unclosed orders = stock again.
//!
//! If Redis fails here the deliveries are not acked; the redelivery finds
//! the batch settled in MySQL and runs this step again.

use std::collections::BTreeMap;

use redis::aio::ConnectionLike;
use seckill_contracts::keys::KeySchema;
use serde::{Deserialize, Serialize};

use super::order_writer::{Outcome, Settlement};
use crate::statuses::{FailReason, ResultStatus};

/// The settle script, shared with the gateway's Redis script folder.
pub const SETTLE_SCRIPT: &str = include_str!("../../../lua/workers/settle.lua");

/// How long a result stays pollable.
pub const RESULT_TTL_SECS: u64 = 24 * 3600;

/// The JSON a buyer's result poll reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultRecord {
    pub status: ResultStatus,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub order_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<FailReason>,
}

/// What `settle.lua` does with one item (its `mode` argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SettleMode {
    /// The order exists: clear the reservation.
    Success,
    /// The order was written by this batch: as `Success`, and take its
    /// unit from the counter if its admission's Redis writes were lost.
    Created,
    /// Failed: clear it, give the unit back, unmark the buyer.
    Release,
    /// The buyer has another order: clear it, give back only its unit.
    Duplicate,
}

impl SettleMode {
    fn as_str(self) -> &'static str {
        match self {
            SettleMode::Success => "success",
            SettleMode::Created => "created",
            SettleMode::Release => "release",
            SettleMode::Duplicate => "duplicate",
        }
    }
}

impl ResultRecord {
    /// `success` with the order.
    pub fn success(order_id: &str) -> ResultRecord {
        ResultRecord {
            status: ResultStatus::Success,
            order_id: Some(order_id.to_string()),
            reason: None,
        }
    }

    /// `failed` for `reason`.
    pub fn failed(reason: FailReason) -> ResultRecord {
        ResultRecord {
            status: ResultStatus::Failed,
            order_id: None,
            reason: Some(reason),
        }
    }

    /// The stored JSON.
    pub fn to_json(&self) -> String {
        // Strings and enums only: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// What the buyer of `outcome` should see, and the settle mode.
    fn of(outcome: &Outcome) -> (ResultRecord, SettleMode) {
        match &outcome.settlement {
            Settlement::Success { order_id } if outcome.already_settled => {
                (ResultRecord::success(order_id), SettleMode::Success)
            }
            Settlement::Success { order_id } => {
                (ResultRecord::success(order_id), SettleMode::Created)
            }
            // The buyer has an order; the poll shows it.
            Settlement::Failed {
                reason: FailReason::Duplicate,
                existing_order: Some(id),
            } => (ResultRecord::success(id), SettleMode::Duplicate),
            Settlement::Failed {
                reason: FailReason::Duplicate,
                existing_order: None,
            } => (
                ResultRecord::failed(FailReason::Duplicate),
                SettleMode::Duplicate,
            ),
            Settlement::Failed { reason, .. } => {
                (ResultRecord::failed(*reason), SettleMode::Release)
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
                .arg(record.to_json())
                .arg(mode.as_str());
        }
        let (back, taken): (u64, u64) = inv.invoke_async(redis).await?;
        given_back += back;
        if taken > 0 {
            tracing::warn!(
                sale_id,
                taken,
                "orders whose admission Redis had lost (a failover or a rebuild): \
                 their units taken from the stock counter now"
            );
        }
    }
    Ok(given_back)
}

#[cfg(test)]
mod tests {
    use super::*;
    use seckill_contracts::OrderMessage;

    fn of(settlement: Settlement) -> (String, SettleMode) {
        of_settled(settlement, false)
    }

    fn of_settled(settlement: Settlement, already_settled: bool) -> (String, SettleMode) {
        let outcome = Outcome {
            message: OrderMessage::new("m".into(), 1, 2, 0),
            settlement,
            already_settled,
        };
        let (record, mode) = ResultRecord::of(&outcome);
        (record.to_json(), mode)
    }

    #[test]
    fn each_settlement_has_its_result_and_mode() {
        let success = Settlement::Success {
            order_id: "o1".into(),
        };
        assert_eq!(
            of(success.clone()),
            (
                r#"{"status":"success","order_id":"o1"}"#.into(),
                SettleMode::Created
            )
        );
        assert_eq!(
            of_settled(success, true),
            (
                r#"{"status":"success","order_id":"o1"}"#.into(),
                SettleMode::Success
            ),
            "a redelivery wrote nothing: nothing to take"
        );
        let duplicate = Settlement::Failed {
            reason: FailReason::Duplicate,
            existing_order: Some("o0".into()),
        };
        assert_eq!(
            of(duplicate),
            (
                r#"{"status":"success","order_id":"o0"}"#.into(),
                SettleMode::Duplicate
            ),
            "the buyer's poll shows the order they have"
        );
        let sold_out = Settlement::Failed {
            reason: FailReason::SoldOut,
            existing_order: None,
        };
        assert_eq!(
            of(sold_out),
            (
                r#"{"status":"failed","reason":"sold_out"}"#.into(),
                SettleMode::Release
            )
        );
    }
}
