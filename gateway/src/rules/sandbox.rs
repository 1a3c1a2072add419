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
//!
//! Limits belong to the call, not to the VM. Calls of many requests share
//! one VM: each runs as a coroutine, and while one waits for Redis or the
//! broker another runs. So a call's instruction allowance and deadline
//! ([`CallBudget`]) travel with the call's future as a tokio task-local,
//! which the budget hook reads whenever it fires: whichever call is running
//! at that instant pays for its own instructions, and no call can use up or
//! reset another's.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlua::chunk::ChunkMode;
use mlua::{Function, HookTriggers, Lua, LuaOptions, StdLib, Table, Value, VmState};

/// Instructions between two budget checks. Small enough that a doubling
/// string (`s = s .. s`) cannot get far past the memory cap between checks.
const HOOK_STEP: u32 = 100;

/// Limits every phase call runs under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Instructions one call may run in all (its I/O waits do not count).
    pub instruction_budget: u64,
    pub memory_bytes: usize,
    /// Wall-clock limit of a whole call, I/O included.
    pub call_timeout: Duration,
}

/// What one phase call may still spend: its own instructions and its own
/// deadline. Lives in [`CALL`] for exactly the duration of the call.
pub struct CallBudget {
    instructions_left: Cell<i64>,
    deadline: Instant,
}

tokio::task_local! {
    /// The budget of the rule call being polled on this thread.
    static CALL: CallBudget;
}

impl CallBudget {
    fn new(limits: Limits) -> CallBudget {
        CallBudget {
            instructions_left: Cell::new(
                i64::try_from(limits.instruction_budget).unwrap_or(i64::MAX),
            ),
            deadline: Instant::now() + limits.call_timeout,
        }
    }

    /// Time left before the current rule call is cut; `None` outside a
    /// rule call. Host functions that wait for I/O size their own deadlines
    /// from it, so they end (and answer) before the call is cut.
    pub fn remaining() -> Option<Duration> {
        CALL.try_with(|call| call.deadline.saturating_duration_since(Instant::now()))
            .ok()
    }

    /// Charges `n` instructions to the running call; false once it has
    /// none left. Outside a call nothing may run, so that is "none left".
    fn charge(n: u32) -> bool {
        CALL.try_with(|call| {
            let left = call.instructions_left.get() - i64::from(n);
            call.instructions_left.set(left);
            left > 0
        })
        .unwrap_or(false)
    }
}

/// What a rule may never reach (see the module docs).
const REMOVED_GLOBALS: [&str; 17] = [
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
];

/// A fresh VM with the dangerous globals removed, `require` confined to
/// `modules`, and the budget hook installed on every coroutine it creates.
pub fn new_vm(modules: Arc<BTreeMap<String, String>>, limits: Limits) -> mlua::Result<Lua> {
    let libs = StdLib::TABLE | StdLib::STRING | StdLib::MATH | StdLib::BIT | StdLib::JIT;
    let lua = Lua::new_with(libs, LuaOptions::default())?;
    lua.load("if jit then jit.off() jit.flush() end")
        .set_name("=sandbox")
        .exec()?;
    remove_dangerous_globals(&lua)?;
    cap_string_rep(&lua, limits.memory_bytes)?;
    install_budget_hook(&lua, limits.memory_bytes)?;
    install_require(&lua, modules)?;
    Ok(lua)
}

fn remove_dangerous_globals(lua: &Lua) -> mlua::Result<()> {
    let globals = lua.globals();
    for name in REMOVED_GLOBALS {
        globals.raw_set(name, Value::Nil)?;
    }
    // The string metatable's __index is this same table, so removing dump
    // here also closes ("").dump.
    let string: Table = globals.get("string")?;
    string.raw_set("dump", Value::Nil)
}

/// One call can allocate a huge string before any hook runs; cap it.
fn cap_string_rep(lua: &Lua, max_len: usize) -> mlua::Result<()> {
    let string: Table = lua.globals().get("string")?;
    let rep: Function = string.get("rep")?;
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
    )
}

/// Charges the running call for every [`HOOK_STEP`] instructions and
/// checks the memory cap. The cap is checked here, not by the allocator: an
/// allocator limit makes mlua run every string and table operation in
/// protected mode, which tripled the cost of a rule call.
fn install_budget_hook(lua: &Lua, memory_cap: usize) -> mlua::Result<()> {
    lua.set_global_hook(
        HookTriggers::new().every_nth_instruction(HOOK_STEP),
        move |lua, _| {
            if !CallBudget::charge(HOOK_STEP) {
                return Err(mlua::Error::runtime("instruction budget exceeded"));
            }
            if lua.used_memory() > memory_cap {
                return Err(mlua::Error::runtime("memory cap exceeded"));
            }
            Ok(VmState::Continue)
        },
    )
}

/// `require` that only finds the rule set's own modules, compiled as text.
fn install_require(lua: &Lua, modules: Arc<BTreeMap<String, String>>) -> mlua::Result<()> {
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
    lua.globals().raw_set("require", require)
}

/// Module names are plain identifiers: no paths, no dots.
pub fn is_module_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 64
}

/// Runs `f(args)` synchronously under a fresh budget (used while loading
/// and for `selftest`, where no I/O is possible).
pub fn call_sync<R: mlua::FromLuaMulti>(
    lua: &Lua,
    f: &Function,
    args: impl mlua::IntoLuaMulti,
    limits: Limits,
) -> mlua::Result<R> {
    let result = CALL.sync_scope(CallBudget::new(limits), || f.call::<R>(args));
    reclaim_after_error(lua, &result);
    result
}

/// Runs `f(args)` as a (recycled) coroutine under its own budget and the
/// call timeout; host functions may await I/O in between, and other
/// requests' coroutines run on the same VM meanwhile, each on its own
/// budget.
pub async fn call_async<R: mlua::FromLuaMulti>(
    lua: &Lua,
    f: &Function,
    args: impl mlua::IntoLuaMulti,
    limits: Limits,
) -> mlua::Result<R> {
    let call = tokio::time::timeout(limits.call_timeout, f.call_async::<R>(args));
    let result = match CALL.scope(CallBudget::new(limits), call).await {
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

    fn vm() -> Lua {
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
            call_timeout: Duration::from_secs(5),
        }
    }

    fn run(code: &str) -> mlua::Result<Value> {
        let lua = vm();
        let f = lua.load(code).set_mode(ChunkMode::Text).into_function()?;
        call_sync(&lua, &f, (), limits(200_000))
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
        let lua = vm();
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
        let lua = vm();
        let bad = lua.load("while true do end").into_function().unwrap();
        assert!(call_sync::<Value>(&lua, &bad, (), limits(100_000)).is_err());
        let good = lua.load("return 1 + 1").into_function().unwrap();
        assert_eq!(
            call_sync::<i64>(&lua, &good, (), limits(100_000)).unwrap(),
            2
        );
    }

    /// Each call has its own allowance: 100 calls interleaving on one VM at
    /// their I/O waits, each well inside the budget, all finish, though
    /// together they run far more instructions than one budget; a runaway
    /// call among them is still stopped.
    #[tokio::test]
    async fn budget_is_per_call_not_per_vm() {
        let lua = vm();
        lua.globals()
            .set(
                "wait_io",
                lua.create_async_function(|_, ms: u64| async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(())
                })
                .unwrap(),
            )
            .unwrap();
        let healthy: Function = lua
            .load(
                "return function(n) local x = 0 for i = 1, n do x = x + i end \
                 wait_io(20) for i = 1, n do x = x + i end return x end",
            )
            .eval()
            .unwrap();
        let runaway: Function = lua
            .load("return function() wait_io(5) while true do end end")
            .eval()
            .unwrap();
        // ~2 x 2,000 loop iterations of a few instructions each: a fraction of
        // the 60,000 allowance per call, but 100 of them need millions.
        let budget = limits(60_000);
        let calls = (0..100).map(|_| call_async::<i64>(&lua, &healthy, 2_000, budget));
        let (results, stopped) = tokio::join!(
            futures::future::join_all(calls),
            call_async::<Value>(&lua, &runaway, (), budget)
        );
        for result in results {
            assert_eq!(result.unwrap(), 2 * (2_000 * 2_001 / 2));
        }
        let err = stopped.unwrap_err().to_string();
        assert!(err.contains("instruction budget"), "{err}");
    }

    #[tokio::test]
    async fn host_functions_see_the_calls_deadline() {
        let lua = vm();
        lua.globals()
            .set(
                "remaining_ms",
                lua.create_function(|_, ()| {
                    Ok(CallBudget::remaining().map(|d| d.as_millis() as u64))
                })
                .unwrap(),
            )
            .unwrap();
        let f: Function = lua
            .load("return function() return remaining_ms() end")
            .eval()
            .unwrap();
        let left: Option<u64> = call_async(&lua, &f, (), limits(10_000)).await.unwrap();
        let left = left.expect("inside a call");
        assert!((4_000..=5_000).contains(&left), "{left}");
        assert!(CallBudget::remaining().is_none(), "outside any call");
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
