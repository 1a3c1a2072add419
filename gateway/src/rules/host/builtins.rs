//! Small pure functions rules need and Lua's sandboxed library lacks:
//! `seckill.now_ms`, `seckill.uuid`, `seckill.json_encode`,
//! `seckill.json_decode`.

use mlua::{Lua, LuaSerdeExt, Table, Value};

pub(super) fn install(lua: &Lua, api: &Table) -> mlua::Result<()> {
    api.set(
        "now_ms",
        lua.create_function(|_, ()| Ok(chrono::Utc::now().timestamp_millis()))?,
    )?;
    api.set(
        "uuid",
        lua.create_function(|_, ()| Ok(uuid::Uuid::now_v7().simple().to_string()))?,
    )?;
    api.set(
        "json_encode",
        lua.create_function(|lua, v: Value| {
            let json: serde_json::Value = lua.from_value(v)?;
            Ok(json.to_string())
        })?,
    )?;
    api.set(
        "json_decode",
        lua.create_function(|lua, s: String| {
            let json: serde_json::Value = serde_json::from_str(&s)
                .map_err(|e| mlua::Error::runtime(format!("json_decode: {e}")))?;
            lua.to_value(&json)
        })?,
    )
}
