//! Building one hardened Lua VM and running a phase function in it under an
//! instruction budget and a memory cap.
//!
//! What a rule cannot reach: `os`, `io`, `debug`, `package`, `ffi`, `jit`,
//! `load`/`loadstring`/`dofile`/`loadfile` (so no bytecode either),
//! `string.dump`, `collectgarbage`, `setfenv`/`getfenv`. `require` is
//! replaced by one that only returns modules of the current rule set (files
//! directly in the rules folder), compiled as text. The JIT is switched off
//! because LuaJIT does not run count hooks inside compiled traces, and the
//! hook is what stops an infinite loop.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use mlua::chunk::ChunkMode;
use mlua::{Function, HookTriggers, Lua, LuaOptions, StdLib, Table, Value, VmState};

/// Instructions between two budget checks. Small enough that a doubling
/// string (`s = s .. s`) cannot get far past the memory cap between checks.
const HOOK_STEP: u32 = 100;

/// Limits every phase call runs under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Instructions a call may run between two waits for I/O.
    pub instruction_budget: u64,
    pub memory_bytes: usize,
    /// Wall-clock limit of a whole call, I/O included.
    pub call_timeout: std::time::Duration,
}

/// The instruction counter of one VM, shared with its hook. A call sets it
/// to the budget when it starts; the hook counts it down.
#[derive(Clone)]
pub struct Budget(Arc<AtomicI64>);

impl Budget {
    fn reset(&self, limits: Limits) {
        let n = limits.instruction_budget.min(i64::MAX as u64) as i64;
        self.0.store(n, Ordering::Relaxed);
    }
}

/// A fresh VM with the dangerous globals removed, `require` confined to
/// `modules`, and the budget hook installed on every coroutine it creates.
pub fn new_vm(
    modules: Arc<BTreeMap<String, String>>,
    limits: Limits,
) -> mlua::Result<(Lua, Budget)> {
    let libs = StdLib::TABLE | StdLib::STRING | StdLib::MATH | StdLib::BIT | StdLib::JIT;
    let lua = Lua::new_with(libs, LuaOptions::default())?;
    lua.load("if jit then jit.off() jit.flush() end")
        .set_name("=sandbox")
        .exec()?;
    let globals = lua.globals();
    for name in [
        "os",
        "io",
        "debug",
        "package",
        "ffi",
        "jit",
        "load",
        "loadstring",
        "dofile",
        "loadfile",
        "module",
        "require",
        "setfenv",
        "getfenv",
        "collectgarbage",
        "newproxy",
        "gcinfo",
    ] {
        globals.raw_set(name, Value::Nil)?;
    }
    // The string metatable's __index is this same table, so removing dump
    // here also closes ("").dump.
    let string: Table = globals.get("string")?;
    string.raw_set("dump", Value::Nil)?;
    // One call can allocate a huge string before any hook runs; cap it.
    let rep: Function = string.get("rep")?;
    let max_len = limits.memory_bytes;
    string.raw_set(
        "rep",
        lua.create_function(
            move |_, (s, n, sep): (mlua::LuaString, i64, Option<mlua::LuaString>)| {
                let sep_len = sep.as_ref().map_or(0, |s| s.as_bytes().len());
                let total = (s.as_bytes().len() + sep_len).saturating_mul(n.max(0) as usize);
                if total > max_len {
                    return Err(mlua::Error::runtime(
                        "string.rep: result exceeds the memory cap",
                    ));
                }
                rep.call::<mlua::LuaString>((s, n, sep))
            },
        )?,
    )?;

    // The cap is checked by the budget hook, not the allocator: an allocator
    // limit makes mlua run every string and table operation in protected
    // mode, which tripled the cost of a rule call.
    let budget = Budget(Arc::new(AtomicI64::new(0)));
    let counter = budget.0.clone();
    let memory_cap = limits.memory_bytes;
    lua.set_global_hook(
        HookTriggers::new().every_nth_instruction(HOOK_STEP),
        move |lua, _| {
            if counter.fetch_sub(i64::from(HOOK_STEP), Ordering::Relaxed) <= i64::from(HOOK_STEP) {
                return Err(mlua::Error::runtime("instruction budget exceeded"));
            }
            if lua.used_memory() > memory_cap {
                return Err(mlua::Error::runtime("memory cap exceeded"));
            }
            Ok(VmState::Continue)
        },
    )?;

    let loaded = lua.create_table()?;
    let require = lua.create_function(move |lua, name: String| {
        if let Some(v) = loaded.raw_get::<Option<Value>>(name.as_str())? {
            return Ok(v);
        }
        if !is_module_name(&name) {
            return Err(mlua::Error::runtime(format!(
                "require: invalid module name `{name}`"
            )));
        }
        let Some(src) = modules.get(&name) else {
            return Err(mlua::Error::runtime(format!(
                "require: no module `{name}` in the rules folder"
            )));
        };
        let value: Value = lua
            .load(src.as_str())
            .set_name(format!("@{name}.lua"))
            .set_mode(ChunkMode::Text)
            .eval()?;
        let value = if value.is_nil() {
            Value::Boolean(true)
        } else {
            value
        };
        loaded.raw_set(name.as_str(), value.clone())?;
        Ok(value)
    })?;
    globals.raw_set("require", require)?;
    Ok((lua, budget))
}

/// Module names are plain identifiers: no paths, no dots.
pub fn is_module_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 64
}

/// Runs `f(args)` synchronously under the budget (used while loading and for
/// `selftest`, where no I/O is possible).
pub fn call_sync<R: mlua::FromLuaMulti>(
    lua: &Lua,
    f: &Function,
    args: impl mlua::IntoLuaMulti,
    limits: Limits,
    budget: &Budget,
) -> mlua::Result<R> {
    budget.reset(limits);
    let result = f.call::<R>(args);
    reclaim_after_error(lua, &result);
    result
}

/// Runs `f(args)` as a (recycled) coroutine under the budget and the call
/// timeout; host functions may await I/O in between, and other requests'
/// coroutines run on the same VM meanwhile. The budget restarts with every
/// call, so it bounds each stretch of computation rather than a whole call
/// that waits on I/O; the timeout bounds the whole call.
pub async fn call_async<R: mlua::FromLuaMulti>(
    lua: &Lua,
    f: &Function,
    args: impl mlua::IntoLuaMulti,
    limits: Limits,
    budget: &Budget,
) -> mlua::Result<R> {
    budget.reset(limits);
    let result = match tokio::time::timeout(limits.call_timeout, f.call_async::<R>(args)).await {
        Ok(r) => r,
        Err(_) => Err(mlua::Error::runtime("rule call timed out")),
    };
    reclaim_after_error(lua, &result);
    result
}

/// A request that blew the memory cap leaves garbage behind; collect it now
/// so the next request on this VM starts clean.
fn reclaim_after_error<R>(lua: &Lua, result: &mlua::Result<R>) {
    if result.is_err() {
        let _ = lua.gc_collect();
        let _ = lua.gc_collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> (Lua, Budget) {
        let modules = Arc::new(BTreeMap::from([(
            "helper".to_string(),
            "return { twice = function(x) return 2 * x end }".to_string(),
        )]));
        new_vm(modules, limits(200_000)).unwrap()
    }

    fn limits(instruction_budget: u64) -> Limits {
        Limits {
            instruction_budget,
            memory_bytes: 8 * 1024 * 1024,
            call_timeout: std::time::Duration::from_secs(5),
        }
    }

    fn run(code: &str) -> mlua::Result<Value> {
        let (lua, budget) = vm();
        let f = lua.load(code).set_mode(ChunkMode::Text).into_function()?;
        call_sync(&lua, &f, (), limits(200_000), &budget)
    }

    #[test]
    fn dangerous_globals_are_gone() {
        for code in [
            "return os.execute('true')",
            "return io.open('/etc/passwd')",
            "return debug.getinfo(1)",
            "return package.loaded",
            "return load('return 1')()",
            "return loadstring('return 1')()",
            "return dofile('/etc/passwd')",
            "return string.dump(function() end)",
            "return (''):dump()",
            "return require('os')",
            "return require('../../etc/passwd')",
            "return collectgarbage('count')",
            "return jit.on()",
            "return ffi.C",
        ] {
            assert!(run(code).is_err(), "{code} must fail");
        }
    }

    #[test]
    fn require_sees_only_rule_modules() {
        assert_eq!(
            run("return require('helper').twice(21)").unwrap(),
            Value::Integer(42)
        );
        // cached: the same table twice
        assert_eq!(
            run("return require('helper') == require('helper')").unwrap(),
            Value::Boolean(true)
        );
    }

    #[test]
    fn bytecode_is_refused() {
        let (lua, _) = vm();
        let chunk = lua
            .load(&b"\x1bLJ\x02\x00"[..])
            .set_mode(ChunkMode::Text)
            .into_function();
        assert!(chunk.is_err());
    }

    #[test]
    fn infinite_loop_hits_the_budget() {
        let err = run("while true do end").unwrap_err().to_string();
        assert!(err.contains("instruction budget"), "{err}");
        let err = run("local i = 0 repeat i = i + 1 until false")
            .unwrap_err()
            .to_string();
        assert!(err.contains("instruction budget"), "{err}");
    }

    #[test]
    fn memory_bomb_is_stopped() {
        let err = run("local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 1024) .. i end")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("memory") || err.contains("instruction budget"),
            "{err}"
        );
        let err = run("return string.rep('x', 1e9)").unwrap_err().to_string();
        assert!(
            err.contains("memory") || err.contains("not enough"),
            "{err}"
        );
    }

    #[test]
    fn vm_survives_a_failed_call() {
        let (lua, budget) = vm();
        let bad = lua.load("while true do end").into_function().unwrap();
        assert!(call_sync::<Value>(&lua, &bad, (), limits(100_000), &budget).is_err());
        let good = lua.load("return 1 + 1").into_function().unwrap();
        assert_eq!(
            call_sync::<i64>(&lua, &good, (), limits(100_000), &budget).unwrap(),
            2
        );
    }

    #[test]
    fn module_names() {
        assert!(is_module_name("admission"));
        assert!(is_module_name("rate_2"));
        for bad in ["", "../x", "a.b", "A", "a/b", "1x"] {
            assert!(!is_module_name(bad), "{bad}");
        }
    }
}
