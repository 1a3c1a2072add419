//! `seckill.sale` (this gateway's local copy of a sale's info, read from
//! Redis once per TTL) and `seckill.sale_event` (sold-out / reopened /
//! updated notices every gateway applies).

use std::sync::Arc;

use mlua::{Lua, Table, Value};
use seckill_contracts::sale_events::{SaleEvent, SaleEventKind};

use crate::sale_directory::SaleLookup;
use crate::services::HostServices;

use super::{lua_error, set_async, within_redis_budget};

pub(super) fn install(lua: &Lua, api: &Table, services: &Arc<HostServices>) -> mlua::Result<()> {
    set_async(
        lua,
        api,
        "sale",
        services.clone(),
        |lua, svc, sale_id: u64| async move {
            let found = within_redis_budget(&svc, async {
                let conn = svc.redis().await.map_err(lua_error)?;
                svc.sales.lookup(&conn, sale_id).await.map_err(lua_error)
            })
            .await?;
            let t = lua.create_table()?;
            t.set("id", sale_id)?;
            match found {
                SaleLookup::Unknown => return Ok(Value::Nil),
                SaleLookup::NotReady => t.set("ready", false)?,
                SaleLookup::Ready(s) => {
                    t.set("ready", true)?;
                    t.set("starts_at_ms", s.starts_at_ms)?;
                    t.set("ends_at_ms", s.ends_at_ms)?;
                    t.set("stock_total", s.stock_total)?;
                }
            }
            t.set("sold_out", svc.sales.is_sold_out(sale_id))?;
            Ok(Value::Table(t))
        },
    )?;
    set_async(
        lua,
        api,
        "sale_event",
        services.clone(),
        |_, svc, (sale_id, kind): (u64, String)| async move {
            let kind = SaleEventKind::parse(&kind).ok_or_else(|| {
                mlua::Error::runtime(format!(
                    "sale_event: kind must be updated, sold_out or reopened, not `{kind}`"
                ))
            })?;
            within_redis_budget(&svc, async {
                let mut conn = svc.redis().await.map_err(lua_error)?;
                svc.sales
                    .announce(&mut conn, SaleEvent { sale_id, kind })
                    .await
                    .map_err(lua_error)
            })
            .await?;
            Ok(true)
        },
    )
}
