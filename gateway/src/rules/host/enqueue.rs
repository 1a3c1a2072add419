//! `seckill.enqueue(order)`: hands an admitted purchase to the broker, or
//! gives its reservation back, and tells the rule which (see
//! [`crate::handoff`] for why this runs outside the rule call).
//!
//! Returns `outcome, error, retry_after_secs`: `outcome` is one of
//! `queued`, `claimed`, `released`, `not_held`, `release_failed`; `error`
//! says why the publish (and the release) failed; `retry_after_secs` is how
//! long a buyer whose unit could not be given back must wait before a
//! retry can be admitted.

use std::sync::Arc;

use mlua::{Lua, Table};
use seckill_contracts::message::OrderMessage;

use crate::handoff::{hand_off, Handoff};
use crate::rules::sandbox::CallBudget;
use crate::services::HostServices;

use super::set_async;

pub(super) fn install(lua: &Lua, api: &Table, services: &Arc<HostServices>) -> mlua::Result<()> {
    set_async(
        lua,
        api,
        "enqueue",
        services.clone(),
        |_, svc, order: Table| {
            let msg = order_message(&order);
            // Read now: the hand-off task runs outside the call's task-local.
            let time_left = CallBudget::remaining().unwrap_or_else(|| svc.call_timeout());
            async move {
                let report = hand_off(svc.clone(), msg?, time_left).await;
                let retry_after = (report.outcome == Handoff::ReleaseFailed)
                    .then(|| svc.stranded_reservation_secs());
                Ok((report.outcome.as_str(), report.error, retry_after))
            }
        },
    )
}

fn order_message(order: &Table) -> mlua::Result<OrderMessage> {
    Ok(OrderMessage::new(
        order.get("message_id")?,
        order.get("sale_id")?,
        order.get("user_id")?,
        order
            .get::<Option<i64>>("admitted_at_ms")?
            .unwrap_or_else(|| chrono::Utc::now().timestamp_millis()),
    ))
}
