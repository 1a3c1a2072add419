//! The host API: the `seckill` table every rule sees. Rust does the I/O
//! (Redis, RabbitMQ, metrics, logs); Lua only decides.
//!
//! One installer per family of functions, each in its own file:
//! [`respond`] (answers), [`shortcut`] (answers replayed without Lua),
//! [`redis`] (scripts, keys, the sliding window), [`sale`] (the local sale
//! copy and its events), [`enqueue`] (the hand-off to the broker),
//! [`dict`] (the process-wide dict and token buckets), [`log_metrics`]
//! (logs and counters) and [`builtins`] (clock, ids, JSON).
//!
//! The functions are created once per VM and capture the process-wide
//! [`HostServices`] plus the Redis scripts of their own rule version, so a
//! request that started on version N keeps calling version N's scripts.
//! Functions that do I/O are async: the calling coroutine yields while the
//! proxy thread serves other requests. The full reference is `lua/README.md`.

mod builtins;
mod dict;
mod enqueue;
mod log_metrics;
mod redis;
mod respond;
mod sale;
mod shortcut;

use std::future::Future;
use std::sync::Arc;

use mlua::{FromLuaMulti, IntoLuaMulti, Lua, Table};

use crate::redis_scripts::ScriptSet;
use crate::services::HostServices;

use super::sandbox::CallBudget;

use super::shortcuts::Shortcuts;

pub use respond::RESPONSE_MARK;

/// What the host functions of one VM capture.
pub struct Host {
    pub services: Arc<HostServices>,
    pub scripts: Arc<ScriptSet>,
    pub shortcuts: Arc<Shortcuts>,
}

/// Registers `seckill` (and `print`) in `lua`'s globals.
pub fn install(lua: &Lua, host: Host) -> mlua::Result<()> {
    let api = lua.create_table()?;
    respond::install(lua, &api)?;
    shortcut::install(lua, &api, &host.shortcuts, &host.services)?;
    redis::install(lua, &api, &host)?;
    sale::install(lua, &api, &host.services)?;
    enqueue::install(lua, &api, &host.services)?;
    dict::install(lua, &api, &host.services)?;
    log_metrics::install(lua, &api, &host.services)?;
    builtins::install(lua, &api)?;
    lua.globals().set("seckill", api)?;
    Ok(())
}

/// Any error a host function meets, as the Lua error the rule sees.
fn lua_error(e: impl std::fmt::Display) -> mlua::Error {
    mlua::Error::runtime(e.to_string())
}

/// Runs a host function's Redis work within what the rule call has left
/// minus the rollback reserve. A stalled Redis (a master failing over, a
/// dead route) then ends in an error the rule answers itself, a 503 with
/// `Retry-After`, instead of the whole call being cut with a 500; and the
/// reserve is still there for giving a reservation back.
async fn within_redis_budget<T>(
    svc: &HostServices,
    work: impl Future<Output = mlua::Result<T>>,
) -> mlua::Result<T> {
    let left = CallBudget::remaining().unwrap_or_else(|| svc.call_timeout());
    let wait = left.saturating_sub(svc.rollback_reserve());
    match tokio::time::timeout(wait, work).await {
        Ok(result) => result,
        Err(_) => Err(mlua::Error::runtime(format!(
            "redis call timed out after {} ms",
            wait.as_millis()
        ))),
    }
}

/// Registers `seckill.<name>` as an async function whose every call gets
/// its own clone of `ctx` (the services, and the scripts where needed): the
/// one place the per-call cloning is written.
fn set_async<C, A, R, F, Fut>(lua: &Lua, api: &Table, name: &str, ctx: C, f: F) -> mlua::Result<()>
where
    C: Clone + mlua::MaybeSend + 'static,
    A: FromLuaMulti + mlua::MaybeSend + 'static,
    R: IntoLuaMulti + 'static,
    F: Fn(Lua, C, A) -> Fut + mlua::MaybeSend + 'static,
    Fut: Future<Output = mlua::Result<R>> + mlua::MaybeSend + 'static,
{
    let function = lua.create_async_function(move |lua, args: A| f(lua, ctx.clone(), args))?;
    api.set(name, function)
}
