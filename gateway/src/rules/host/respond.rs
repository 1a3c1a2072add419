//! `seckill.respond` and `seckill.reject`: the answers an `access` phase
//! returns. Each builds a marked table that [`crate::rules::decision`]
//! turns into the response, so a rule cannot pass off any other table.

use mlua::{Lua, LuaSerdeExt, Table, Value};

use crate::problem::problem_body;

/// Marks a table returned by `seckill.respond` / `seckill.reject`.
pub const RESPONSE_MARK: &str = "__seckill_response";

pub(super) fn install(lua: &Lua, api: &Table) -> mlua::Result<()> {
    api.set(
        "respond",
        lua.create_function(
            |lua, (status, body, headers): (u16, Value, Option<Table>)| {
                let t = response_table(lua, status, headers)?;
                match body {
                    Value::Nil => t.set("body", "")?,
                    Value::String(s) => {
                        t.set("body", s)?;
                        t.set("content_type", "text/plain; charset=utf-8")?;
                    }
                    other => {
                        let json: serde_json::Value = lua.from_value(other)?;
                        t.set("body", json.to_string())?;
                        t.set("content_type", "application/json")?;
                    }
                }
                Ok(t)
            },
        )?,
    )?;
    api.set(
        "reject",
        lua.create_function(
            |lua, (status, detail, headers): (u16, Option<String>, Option<Table>)| {
                let t = response_table(lua, status, headers)?;
                let body = problem_body(status, detail.as_deref().unwrap_or_default());
                t.set("body", body.to_string())?;
                t.set("content_type", "application/problem+json")?;
                Ok(t)
            },
        )?,
    )
}

fn response_table(lua: &Lua, status: u16, headers: Option<Table>) -> mlua::Result<Table> {
    if !(200..=599).contains(&status) {
        return Err(mlua::Error::runtime(format!(
            "status {status} is not 200..599"
        )));
    }
    let t = lua.create_table()?;
    t.set(RESPONSE_MARK, true)?;
    t.set("status", status)?;
    if let Some(h) = headers {
        t.set("headers", h)?;
    }
    Ok(t)
}
