//! `seckill.log`, `print`, `seckill.counter` and `seckill.decision`: what a
//! rule tells the operators, through the gateway's `tracing` (target
//! `rules`), its Prometheus registry and its admission tallies
//! ([`crate::decisions`]).

use std::sync::Arc;

use mlua::{Lua, MultiValue, Table, Value, Variadic};

use crate::metrics;
use crate::services::HostServices;

pub(super) fn install(lua: &Lua, api: &Table, services: &Arc<HostServices>) -> mlua::Result<()> {
    let host = services.clone();
    api.set(
        "decision",
        lua.create_function(move |_, (outcome, sale_id): (String, Option<u64>)| {
            host.decisions.record(&outcome, sale_id);
            Ok(())
        })?,
    )?;
    api.set(
        "counter",
        lua.create_function(|_, (name, delta): (String, Option<u64>)| {
            if name.is_empty() || name.len() > 64 {
                return Err(mlua::Error::runtime(
                    "counter: name must be 1 to 64 characters",
                ));
            }
            metrics::RULE_COUNTERS
                .with_label_values(&[name.as_str()])
                .inc_by(delta.unwrap_or(1));
            Ok(())
        })?,
    )?;
    api.set(
        "log",
        lua.create_function(|_, (level, parts): (String, Variadic<Value>)| {
            let msg = join_values(parts);
            match level.as_str() {
                "error" => tracing::error!(target: "rules", "{msg}"),
                "warn" => tracing::warn!(target: "rules", "{msg}"),
                "debug" => tracing::debug!(target: "rules", "{msg}"),
                _ => tracing::info!(target: "rules", "{msg}"),
            }
            Ok(())
        })?,
    )?;
    lua.globals().set(
        "print",
        lua.create_function(|_, parts: Variadic<Value>| {
            tracing::info!(target: "rules", "{}", join_values(parts));
            Ok(())
        })?,
    )
}

fn join_values(parts: Variadic<Value>) -> String {
    let parts: MultiValue = parts.into_iter().collect();
    parts
        .iter()
        .map(|v| match v {
            Value::String(s) => s.to_string_lossy(),
            Value::Nil => "nil".into(),
            Value::Boolean(b) => b.to_string(),
            Value::Integer(i) => i.to_string(),
            Value::Number(n) => n.to_string(),
            other => format!("<{}>", other.type_name()),
        })
        .collect::<Vec<_>>()
        .join(" ")
}
