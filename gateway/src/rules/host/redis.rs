//! `seckill.redis` (a named script of this rule version, by SHA),
//! `seckill.limit` (the sliding window shared by all gateways),
//! `seckill.sale_keys` and `seckill.key` (key names), and the one check
//! every key passes: it must carry this deployment's prefix.

use std::sync::Arc;

use mlua::{Lua, Table, Value, Variadic};
use redis::Value as RedisValue;
use seckill_contracts::keys::KeySchema;

use crate::metrics;
use crate::redis_scripts::{ScriptSet, SLIDING_WINDOW};
use crate::services::HostServices;

use super::{lua_error, set_async, within_redis_budget, Host};

pub(super) fn install(lua: &Lua, api: &Table, host: &Host) -> mlua::Result<()> {
    let ctx = (host.services.clone(), host.scripts.clone());
    set_async(lua, api, "limit", ctx.clone(), |_, (svc, sc), args| {
        limit(svc, sc, args)
    })?;
    set_async(
        lua,
        api,
        "redis",
        ctx,
        |lua, (svc, sc), (name, keys, args): (String, Vec<String>, Variadic<Value>)| {
            let args = args_to_strings(args);
            async move {
                for k in &keys {
                    check_key(&svc.keys, k)?;
                }
                let args = args?;
                let v = within_redis_budget(&svc, async {
                    let mut conn = svc.redis().await.map_err(lua_error)?;
                    sc.call(&mut conn, &name, &keys, &args)
                        .await
                        .map_err(lua_error)
                })
                .await?;
                redis_to_lua(&lua, v)
            }
        },
    )?;
    let svc = host.services.clone();
    api.set(
        "sale_keys",
        lua.create_function(move |lua, (sale_id, user_id): (u64, Option<u64>)| {
            sale_keys(lua, &svc.keys, sale_id, user_id)
        })?,
    )?;
    let svc = host.services.clone();
    api.set(
        "key",
        lua.create_function(move |_, suffix: String| {
            Ok(format!("{}:{suffix}", svc.keys.prefix()))
        })?,
    )
}

/// One attempt against an exact sliding window in Redis.
async fn limit(
    svc: Arc<HostServices>,
    sc: Arc<ScriptSet>,
    (key, limit, window_ms): (String, u32, u64),
) -> mlua::Result<(bool, i64)> {
    check_key(&svc.keys, &key)?;
    let member = uuid::Uuid::now_v7().simple().to_string();
    let args = [limit.to_string(), window_ms.to_string(), member];
    let v = within_redis_budget(&svc, async {
        let mut conn = svc.redis().await.map_err(lua_error)?;
        sc.call(&mut conn, SLIDING_WINDOW, &[key], &args)
            .await
            .map_err(lua_error)
    })
    .await?;
    let (allowed, retry): (i64, i64) = redis::from_redis_value(v).map_err(lua_error)?;
    if allowed != 1 {
        metrics::LIMITER_REJECTIONS
            .with_label_values(&["redis_window"])
            .inc();
    }
    Ok((allowed == 1, retry))
}

fn sale_keys(
    lua: &Lua,
    keys: &KeySchema,
    sale_id: u64,
    user_id: Option<u64>,
) -> mlua::Result<Table> {
    let k = keys.sale(sale_id);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_outside_the_prefix_are_refused() {
        let keys = KeySchema::new("shop");
        assert!(check_key(&keys, "shop:{sale:1}:stock").is_ok());
        for bad in ["shop", "shopx:1", "other:shop:1", ""] {
            assert!(check_key(&keys, bad).is_err(), "{bad} must be refused");
        }
    }
}
