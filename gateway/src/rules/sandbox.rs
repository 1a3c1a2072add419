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

/// Instructions between two budget checks.
const HOOK_STEP: u32 = 1_000;

/// Limits every phase call runs under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub instruction_budget: u64,
    pub memory_bytes: usize,
}

/// A fresh VM with the dangerous globals removed and `require` confined to
/// `modules`. Returns the VM and whether the memory cap is enforced by the
/// allocator (otherwise the budget hook checks it).
pub fn new_vm(modules: Arc<BTreeMap<String, String>>, limits: Limits) -> mlua::Result<(Lua, bool)> {
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

    let native_memory_cap = lua.set_memory_limit(limits.memory_bytes).is_ok();

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
    Ok((lua, native_memory_cap))
}

/// Module names are plain identifiers: no paths, no dots.
pub fn is_module_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 64
}

/// The budget hook: counts instructions down and checks memory when the
/// allocator cannot.
fn budget_hook(
    limits: Limits,
    native_memory_cap: bool,
) -> impl Fn(&Lua, &mlua::debug::Debug) -> mlua::Result<VmState> + Send + 'static {
    let remaining = AtomicI64::new(limits.instruction_budget.min(i64::MAX as u64) as i64);
    move |lua, _| {
        if remaining.fetch_sub(i64::from(HOOK_STEP), Ordering::Relaxed) <= i64::from(HOOK_STEP) {
            return Err(mlua::Error::runtime("instruction budget exceeded"));
        }
        if !native_memory_cap && lua.used_memory() > limits.memory_bytes {
            return Err(mlua::Error::runtime("memory cap exceeded"));
        }
        Ok(VmState::Continue)
    }
}

/// Runs `f(args)` synchronously under the budget (used while loading and for
/// `selftest`, where no I/O is possible).
pub fn call_sync<R: mlua::FromLuaMulti>(
    lua: &Lua,
    f: &Function,
    args: impl mlua::IntoLuaMulti,
    limits: Limits,
    native_memory_cap: bool,
) -> mlua::Result<R> {
    let thread = lua.create_thread(f.clone())?;
    thread.set_hook(
        HookTriggers::new().every_nth_instruction(HOOK_STEP),
        budget_hook(limits, native_memory_cap),
    )?;
    let result = thread.resume(args);
    reclaim_after_error(lua, &result);
    result
}

/// Runs `f(args)` as a coroutine under the budget; host functions may await
/// I/O (Redis, RabbitMQ) in between, and other requests' coroutines run on
/// the same VM meanwhile.
pub async fn call_async<R: mlua::FromLuaMulti>(
    lua: &Lua,
    f: &Function,
    args: impl mlua::IntoLuaMulti,
    limits: Limits,
    native_memory_cap: bool,
) -> mlua::Result<R> {
    let thread = lua.create_thread(f.clone())?;
    thread.set_hook(
        HookTriggers::new().every_nth_instruction(HOOK_STEP),
        budget_hook(limits, native_memory_cap),
    )?;
    let result = thread.into_async::<R>(args)?.await;
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

    fn vm() -> (Lua, bool) {
        let modules = Arc::new(BTreeMap::from([(
            "helper".to_string(),
            "return { twice = function(x) return 2 * x end }".to_string(),
        )]));
        new_vm(
            modules,
            Limits {
                instruction_budget: 200_000,
                memory_bytes: 8 * 1024 * 1024,
            },
        )
        .unwrap()
    }

    fn run(code: &str) -> mlua::Result<Value> {
        let (lua, native) = vm();
        let f = lua.load(code).set_mode(ChunkMode::Text).into_function()?;
        call_sync(
            &lua,
            &f,
            (),
            Limits {
                instruction_budget: 200_000,
                memory_bytes: 8 * 1024 * 1024,
            },
            native,
        )
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
        let (lua, native) = vm();
        let limits = Limits {
            instruction_budget: 100_000,
            memory_bytes: 8 * 1024 * 1024,
        };
        let bad = lua.load("while true do end").into_function().unwrap();
        assert!(call_sync::<Value>(&lua, &bad, (), limits, native).is_err());
        let good = lua.load("return 1 + 1").into_function().unwrap();
        assert_eq!(
            call_sync::<i64>(&lua, &good, (), limits, native).unwrap(),
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
