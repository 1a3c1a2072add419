//! `seckill.dict_*` (a dictionary shared by every thread of this gateway,
//! with per-entry TTL) and `seckill.bucket` (this gateway's local token
//! buckets): process-wide state, no I/O.

use std::sync::Arc;
use std::time::Duration;

use mlua::{Lua, Table, Value};

use crate::metrics;
use crate::services::HostServices;
use crate::shared_dict::DictValue;

pub(super) fn install(lua: &Lua, api: &Table, services: &Arc<HostServices>) -> mlua::Result<()> {
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
                match to_dict_value(value)? {
                    Some(value) => svc.dict.set(&key, value, ttl_ms.map(Duration::from_millis)),
                    None => svc.dict.delete(&key),
                }
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
    )
}

/// A scalar the dict can hold; `None` for nil (which deletes the entry).
fn to_dict_value(value: Value) -> mlua::Result<Option<DictValue>> {
    Ok(Some(match value {
        Value::Boolean(b) => DictValue::Bool(b),
        Value::Integer(i) => DictValue::Int(i),
        Value::Number(n) => DictValue::Num(n),
        Value::String(s) => DictValue::Str(s.to_str()?.to_string()),
        Value::Nil => return Ok(None),
        other => {
            return Err(mlua::Error::runtime(format!(
                "dict_set: cannot store a {}",
                other.type_name()
            )))
        }
    }))
}
