//! The host API: the `seckill` table every rule sees. Rust does the I/O
//! (Redis, RabbitMQ, metrics, logs); Lua only decides.
//!
//! The functions are created once per VM and capture the process-wide
//! [`HostServices`] plus the Redis scripts of their own rule version, so a
//! request that started on version N keeps calling version N's scripts.
//! Functions that do I/O are async: the calling coroutine yields while the
//! proxy thread serves other requests. The full reference is `lua/README.md`.

use std::sync::Arc;
use std::time::Duration;

use mlua::{Lua, LuaSerdeExt, MultiValue, Table, Value, Variadic};
use redis::Value as RedisValue;
use seckill_contracts::keys::KeySchema;
use seckill_contracts::message::OrderMessage;
use seckill_contracts::sale_events::{SaleEvent, SaleEventKind};

use crate::metrics;
use crate::problem::problem_body;
use crate::redis_scripts::{ScriptSet, SLIDING_WINDOW};
use crate::sale_directory::SaleLookup;
use crate::services::HostServices;
use crate::shared_dict::DictValue;

use super::shortcuts::Shortcuts;
use super::Decision;

/// Marks a table returned by `seckill.respond` / `seckill.reject`.
pub const RESPONSE_MARK: &str = "__seckill_response";

/// Registers `seckill` in `lua`'s globals.
pub fn install(
    lua: &Lua,
    services: Arc<HostServices>,
    scripts: Arc<ScriptSet>,
    shortcuts: Arc<Shortcuts>,
) -> mlua::Result<()> {
    let api = lua.create_table()?;

    let table = shortcuts.clone();
    api.set(
        "shortcut",
        lua.create_function(
            move |_, (route, param, value, response, ttl_ms): (String, String, String, Value, u64)| {
                let resp = match super::decision(response) {
                    Ok(Decision::Respond(r)) => r,
                    Ok(Decision::Continue) => {
                        return Err(mlua::Error::runtime(
                            "shortcut: the answer must be seckill.respond(...) or seckill.reject(...)",
                        ))
                    }
                    Err(e) => return Err(mlua::Error::runtime(format!("shortcut: {e}"))),
                };
                table.set(&route, &param, &value, resp, Duration::from_millis(ttl_ms));
                Ok(())
            },
        )?,
    )?;
    let table = shortcuts;
    api.set(
        "shortcut_clear",
        lua.create_function(move |_, (route, param, value): (String, String, String)| {
            table.clear(&route, &param, &value);
            Ok(())
        })?,
    )?;

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
    )?;

    let svc = services.clone();
    api.set(
        "bucket",
        lua.create_function(move |_, (name, rate, burst): (String, f64, u32)| {
            let ok = svc.buckets.take(&name, rate, burst);
            if !ok {
                metrics::LIMITER_REJECTIONS
                    .with_label_values(&["local_bucket"])
                    .inc();
            }
            Ok(ok)
        })?,
    )?;

    let svc = services.clone();
    let sc = scripts.clone();
    api.set(
        "limit",
        lua.create_async_function(move |_, (key, limit, window_ms): (String, u32, u64)| {
            let svc = svc.clone();
            let sc = sc.clone();
            async move {
                check_key(&svc.keys, &key)?;
                let mut conn = svc.redis().await.map_err(mlua::Error::runtime)?;
                let member = uuid::Uuid::now_v7().simple().to_string();
                let v = sc
                    .call(
                        &mut conn,
                        SLIDING_WINDOW,
                        &[key],
                        &[limit.to_string(), window_ms.to_string(), member],
                    )
                    .await
                    .map_err(|e| mlua::Error::runtime(e.to_string()))?;
                let (allowed, retry): (i64, i64) =
                    redis::from_redis_value(v).map_err(|e| mlua::Error::runtime(e.to_string()))?;
                if allowed != 1 {
                    metrics::LIMITER_REJECTIONS
                        .with_label_values(&["redis_window"])
                        .inc();
                }
                Ok((allowed == 1, retry))
            }
        })?,
    )?;

    let svc = services.clone();
    let sc = scripts;
    api.set(
        "redis",
        lua.create_async_function(
            move |lua, (name, keys, args): (String, Vec<String>, Variadic<Value>)| {
                let svc = svc.clone();
                let sc = sc.clone();
                let args = args_to_strings(args);
                async move {
                    for k in &keys {
                        check_key(&svc.keys, k)?;
                    }
                    let args = args?;
                    let mut conn = svc.redis().await.map_err(mlua::Error::runtime)?;
                    let v = sc
                        .call(&mut conn, &name, &keys, &args)
                        .await
                        .map_err(|e| mlua::Error::runtime(e.to_string()))?;
                    redis_to_lua(&lua, v)
                }
            },
        )?,
    )?;

    let svc = services.clone();
    api.set(
        "sale_keys",
        lua.create_function(move |lua, (sale_id, user_id): (u64, Option<u64>)| {
            let k = svc.keys.sale(sale_id);
            let t = lua.create_table()?;
            t.set("base", k.base())?;
            t.set("info", k.info())?;
            t.set("stock", k.stock())?;
            t.set("buyers", k.buyers())?;
            t.set("reservations", k.reservations())?;
            t.set("released", k.released())?;
            if let Some(u) = user_id {
                t.set("path", k.path(u))?;
                t.set("limit", k.limit(u))?;
                t.set("result", k.result(u))?;
            }
            Ok(t)
        })?,
    )?;

    let svc = services.clone();
    api.set(
        "sale",
        lua.create_async_function(move |lua, sale_id: u64| {
            let svc = svc.clone();
            async move {
                let conn = svc.redis().await.map_err(mlua::Error::runtime)?;
                let found = svc
                    .sales
                    .lookup(&conn, sale_id)
                    .await
                    .map_err(|e| mlua::Error::runtime(e.to_string()))?;
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
            }
        })?,
    )?;

    let svc = services.clone();
    api.set(
        "sale_event",
        lua.create_async_function(move |_, (sale_id, kind): (u64, String)| {
            let svc = svc.clone();
            async move {
                let kind = SaleEventKind::parse(&kind).ok_or_else(|| {
                    mlua::Error::runtime(format!(
                        "sale_event: kind must be updated, sold_out or reopened, not `{kind}`"
                    ))
                })?;
                let mut conn = svc.redis().await.map_err(mlua::Error::runtime)?;
                svc.sales
                    .announce(&mut conn, SaleEvent { sale_id, kind })
                    .await
                    .map_err(|e| mlua::Error::runtime(e.to_string()))?;
                Ok(true)
            }
        })?,
    )?;

    let svc = services.clone();
    api.set(
        "key",
        lua.create_function(move |_, suffix: String| {
            Ok(format!("{}:{suffix}", svc.keys.prefix()))
        })?,
    )?;

    let svc = services.clone();
    api.set(
        "publish",
        lua.create_async_function(move |_, order: Table| {
            let svc = svc.clone();
            let msg = (|| -> mlua::Result<OrderMessage> {
                Ok(OrderMessage::new(
                    order.get("message_id")?,
                    order.get("sale_id")?,
                    order.get("user_id")?,
                    order
                        .get::<Option<i64>>("admitted_at_ms")?
                        .unwrap_or_else(|| chrono::Utc::now().timestamp_millis()),
                ))
            })();
            async move {
                let msg = msg?;
                match svc.publish(&msg).await {
                    Ok(()) => Ok((true, None)),
                    Err(e) => Ok((false, Some(e))),
                }
            }
        })?,
    )?;

    let svc = services.clone();
    api.set(
        "dict_get",
        lua.create_function(move |lua, key: String| match svc.dict.get(&key) {
            None => Ok(Value::Nil),
            Some(DictValue::Bool(b)) => Ok(Value::Boolean(b)),
            Some(DictValue::Int(i)) => Ok(Value::Integer(i)),
            Some(DictValue::Num(n)) => Ok(Value::Number(n)),
            Some(DictValue::Str(s)) => Ok(Value::String(lua.create_string(&s)?)),
        })?,
    )?;
    let svc = services.clone();
    api.set(
        "dict_set",
        lua.create_function(
            move |_, (key, value, ttl_ms): (String, Value, Option<u64>)| {
                let value = match value {
                    Value::Boolean(b) => DictValue::Bool(b),
                    Value::Integer(i) => DictValue::Int(i),
                    Value::Number(n) => DictValue::Num(n),
                    Value::String(s) => DictValue::Str(s.to_str()?.to_string()),
                    Value::Nil => {
                        svc.dict.delete(&key);
                        return Ok(());
                    }
                    other => {
                        return Err(mlua::Error::runtime(format!(
                            "dict_set: cannot store a {}",
                            other.type_name()
                        )))
                    }
                };
                svc.dict.set(&key, value, ttl_ms.map(Duration::from_millis));
                Ok(())
            },
        )?,
    )?;
    let svc = services.clone();
    api.set(
        "dict_incr",
        lua.create_function(
            move |_, (key, delta, ttl_ms): (String, Option<i64>, Option<u64>)| {
                Ok(svc
                    .dict
                    .incr(&key, delta.unwrap_or(1), ttl_ms.map(Duration::from_millis)))
            },
        )?,
    )?;
    let svc = services.clone();
    api.set(
        "dict_delete",
        lua.create_function(move |_, key: String| {
            svc.dict.delete(&key);
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
    )?;

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
    )?;

    lua.globals().set("seckill", api)?;
    Ok(())
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

/// Rules may only touch keys of their own deployment.
fn check_key(keys: &KeySchema, key: &str) -> mlua::Result<()> {
    let prefix = keys.prefix();
    if key.len() > prefix.len() && key.starts_with(prefix) && key.as_bytes()[prefix.len()] == b':' {
        Ok(())
    } else {
        Err(mlua::Error::runtime(format!(
            "redis key `{key}` is outside this deployment's prefix `{prefix}:`"
        )))
    }
}

fn args_to_strings(args: Variadic<Value>) -> mlua::Result<Vec<String>> {
    // A single table argument is the list of args; otherwise each value is one.
    let values: Vec<Value> = match args.as_slice() {
        [Value::Table(t)] => t
            .clone()
            .sequence_values::<Value>()
            .collect::<mlua::Result<_>>()?,
        _ => args.into_iter().collect(),
    };
    values
        .into_iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.to_str()?.to_string()),
            Value::Integer(i) => Ok(i.to_string()),
            Value::Number(n) if n.fract() == 0.0 && n.abs() < 9e15 => Ok((n as i64).to_string()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Boolean(b) => Ok(if b { "1".into() } else { "0".into() }),
            other => Err(mlua::Error::runtime(format!(
                "redis argument cannot be a {}",
                other.type_name()
            ))),
        })
        .collect()
}

/// Redis replies as Lua values: integers, strings, arrays; errors raise.
fn redis_to_lua(lua: &Lua, v: RedisValue) -> mlua::Result<Value> {
    Ok(match v {
        RedisValue::Nil => Value::Nil,
        RedisValue::Int(i) => Value::Integer(i),
        RedisValue::BulkString(b) => Value::String(lua.create_string(&b)?),
        RedisValue::SimpleString(s) => Value::String(lua.create_string(&s)?),
        RedisValue::Okay => Value::String(lua.create_string("OK")?),
        RedisValue::Double(d) => Value::Number(d),
        RedisValue::Boolean(b) => Value::Boolean(b),
        RedisValue::Array(items) | RedisValue::Set(items) => {
            let t = lua.create_table()?;
            for (i, item) in items.into_iter().enumerate() {
                t.raw_set(i + 1, redis_to_lua(lua, item)?)?;
            }
            Value::Table(t)
        }
        RedisValue::ServerError(e) => {
            return Err(mlua::Error::runtime(format!("redis: {e:?}")));
        }
        other => Value::String(lua.create_string(format!("{other:?}"))?),
    })
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
