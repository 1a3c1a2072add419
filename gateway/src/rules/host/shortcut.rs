//! `seckill.shortcut` and `seckill.shortcut_clear`: answers a rule stores
//! for the gateway to replay without running Lua (see
//! [`crate::rules::shortcuts`]).

use std::sync::Arc;
use std::time::Duration;

use mlua::{Lua, Table, Value};

use crate::rules::shortcuts::Shortcuts;
use crate::rules::{decision, Decision};
use crate::services::HostServices;

pub(super) fn install(
    lua: &Lua,
    api: &Table,
    shortcuts: &Arc<Shortcuts>,
    services: &Arc<HostServices>,
) -> mlua::Result<()> {
    let table = shortcuts.clone();
    let host = services.clone();
    api.set(
        "shortcut",
        lua.create_function(
            move |_,
                  (route, param, value, response, ttl_ms, outcome, sale_id): (
                String,
                String,
                String,
                Value,
                u64,
                Option<String>,
                Option<u64>,
            )| {
                let resp = match decision(response) {
                    Ok(Decision::Respond(r)) => r,
                    Ok(Decision::Continue) => return Err(mlua::Error::runtime(
                        "shortcut: the answer must be seckill.respond(...) or seckill.reject(...)",
                    )),
                    Err(e) => return Err(mlua::Error::runtime(format!("shortcut: {e}"))),
                };
                let counted = outcome.map(|outcome| host.decisions.resolve(&outcome, sale_id));
                table.set(
                    &route,
                    &param,
                    &value,
                    resp,
                    Duration::from_millis(ttl_ms),
                    counted,
                );
                Ok(())
            },
        )?,
    )?;
    let table = shortcuts.clone();
    api.set(
        "shortcut_clear",
        lua.create_function(move |_, (route, param, value): (String, String, String)| {
            table.clear(&route, &param, &value);
            Ok(())
        })?,
    )
}
