//! The Lua rule engine: what ops edit to change the edge's behaviour without
//! a deploy.
//!
//! A *rule set* is the rules folder at one moment: `main.lua` (returns a
//! table of phase functions: `access` required, `log` and `selftest`
//! optional), other `*.lua` files as modules for `require`, and the Redis
//! scripts in `redis/`. Loading compiles it into one VM per proxy thread.
//!
//! Who touches a VM: the proxy runs one single-threaded runtime per thread
//! (`work_stealing: false` in [`crate::server`]), so a request never moves
//! between threads and each thread only ever uses its own VM. On that VM
//! the calls of many requests run as coroutines, one at a time: a call
//! that waits for I/O is suspended and another runs meanwhile. Everything a
//! call may spend (instructions, wall-clock time) is the call's own
//! ([`sandbox`]), never shared with the calls it interleaves with. (Were a
//! VM ever reached from two threads, mlua's lock would still run one call
//! at a time on it.)
//!
//! ```text
//! reload (file change | SIGHUP | POST /admin/rules/reload)
//!   → read folder → hash → compile + validate in a fresh VM → selftest
//!   → build the VMs → ArcSwap the new set in   (or keep the old, report why)
//! request → current() (an Arc: the request keeps its version to the end)
//!   → access(req) on this thread's VM → Continue | Respond
//! ```

pub mod bundles;
mod host;
mod sandbox;
#[cfg(test)]
mod seckill_rule_tests;
pub mod shortcuts;
mod watch;

use std::collections::{BTreeMap, HashSet};
use std::future::{poll_fn, Future};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};

use arc_swap::ArcSwap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use mlua::{Function, Lua, LuaSerdeExt, Table, Value};
use seckill_contracts::claims::AccessClaims;
use seckill_contracts::rules_bundle::RuleFiles;
use seckill_contracts::scripts::SHARED_NAMES;

pub use sandbox::Limits;
pub use watch::RuleWatcher;

use crate::metrics;
use crate::problem::LocalResponse;
use crate::redis_scripts::ScriptSet;
use crate::services::HostServices;

/// The entry file of a rule set.
pub const ENTRY: &str = "main";

/// Why a rule set was refused, or a phase failed.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("reading rules from {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("rules folder has no {ENTRY}.lua")]
    NoEntry,
    #[error("invalid rule file name `{0}` (use lowercase letters, digits, '_')")]
    BadName(String),
    #[error("{0}")]
    Invalid(String),
    #[error("lua: {0}")]
    Lua(#[from] mlua::Error),
}

/// The request as rules see it.
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    pub request_id: String,
    pub method: String,
    pub path: String,
    pub query: String,
    pub route: String,
    pub params: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub client_ip: String,
    /// Parsed JSON body (local routes only).
    pub body: Option<serde_json::Value>,
    pub claims: Option<Arc<AccessClaims>>,
}

/// What the access phase decided.
#[derive(Debug)]
pub enum Decision {
    /// Go on: proxy to the route's pool.
    Continue,
    /// Answer with this response now.
    Respond(LocalResponse),
}

/// One compiled VM of a rule set.
struct RuleVm {
    lua: Lua,
    access: Function,
    log: Option<Function>,
    /// The thread (its [`VM_SLOT`]) that first ran a call on this VM: its owner.
    home: OnceLock<usize>,
}

impl RuleVm {
    /// Runs `call`, counting every poll made from a thread other than the
    /// VM's owner ([`metrics::LUA_VM_FOREIGN_POLLS`]), so a regression of
    /// the one-VM-per-thread model shows up in the metrics and the tests.
    async fn on_home_thread<F: Future>(&self, call: F) -> F::Output {
        let mut call = pin!(call);
        poll_fn(|cx| {
            let me = VM_SLOT.with(|slot| *slot);
            if *self.home.get_or_init(|| me) != me {
                metrics::LUA_VM_FOREIGN_POLLS.inc();
            }
            call.as_mut().poll(cx)
        })
        .await
    }
}

/// One loaded version of the rules.
pub struct RuleSet {
    pub version: u64,
    pub hash: String,
    pub loaded_at: DateTime<Utc>,
    limits: Limits,
    vms: Vec<RuleVm>,
    shortcuts: Arc<shortcuts::Shortcuts>,
    /// The routes `main.lua` declared (`routes = {...}`); `None`: all. A
    /// request of any other route runs no Lua at all.
    routes: Option<HashSet<String>>,
}

thread_local! {
    /// Which VM this thread uses, and the thread's identity for
    /// [`RuleVm::on_home_thread`]; unique per thread, assigned on first use.
    static VM_SLOT: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed)
    };
}

/// Files of a rule set, checked: module names are valid and no compiled-in
/// script is replaced. From a folder or from a bundle, the same checks and
/// the same hash.
struct Sources {
    modules: BTreeMap<String, String>,
    scripts: BTreeMap<String, String>,
    hash: String,
}

impl Sources {
    fn read_dir(dir: &Path) -> Result<Sources, RuleError> {
        let files = RuleFiles::read_dir(dir).map_err(|source| RuleError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        Sources::check(files)
    }

    fn check(files: RuleFiles) -> Result<Sources, RuleError> {
        if let Some(bad) = files.modules.keys().find(|m| !sandbox::is_module_name(m)) {
            return Err(RuleError::BadName(format!("{bad}.lua")));
        }
        if let Some(name) = SHARED_NAMES
            .iter()
            .find(|n| files.scripts.contains_key(**n))
        {
            return Err(RuleError::Invalid(format!(
                "redis/{name}.lua: `{name}` is compiled into the gateway and the workers \
                 (lua/shared/{name}.lua) and cannot be replaced by a rule set"
            )));
        }
        let hash = files.hash();
        Ok(Sources {
            modules: files.modules,
            scripts: files.scripts,
            hash,
        })
    }
}

fn build_vm(
    sources: &Sources,
    modules: Arc<BTreeMap<String, String>>,
    scripts: Arc<ScriptSet>,
    services: Arc<HostServices>,
    shortcuts: Arc<shortcuts::Shortcuts>,
    limits: Limits,
) -> Result<(RuleVm, Table), RuleError> {
    let entry = sources.modules.get(ENTRY).ok_or(RuleError::NoEntry)?;
    let lua = sandbox::new_vm(modules, limits)?;
    host::install(
        &lua,
        host::Host {
            services,
            scripts,
            shortcuts,
        },
    )?;
    let chunk = lua
        .load(entry.as_str())
        .set_name(format!("@{ENTRY}.lua"))
        .set_mode(mlua::chunk::ChunkMode::Text)
        .into_function()?;
    let phases: Value = sandbox::call_sync(&lua, &chunk, (), limits)?;
    let Value::Table(phases) = phases else {
        return Err(RuleError::Invalid(format!(
            "{ENTRY}.lua must return a table of phase functions, got {}",
            phases.type_name()
        )));
    };
    let access = match phases.get::<Value>("access")? {
        Value::Function(f) => f,
        other => {
            return Err(RuleError::Invalid(format!(
                "phase `access` must be a function, got {}",
                other.type_name()
            )))
        }
    };
    let log = match phases.get::<Value>("log")? {
        Value::Function(f) => Some(f),
        Value::Nil => None,
        other => {
            return Err(RuleError::Invalid(format!(
                "phase `log` must be a function, got {}",
                other.type_name()
            )))
        }
    };
    for (k, _) in phases.pairs::<String, Value>().flatten() {
        if !matches!(k.as_str(), "access" | "log" | "selftest" | "routes") {
            return Err(RuleError::Invalid(format!(
                "unknown phase `{k}` (known: access, log, selftest, routes)"
            )));
        }
    }
    Ok((
        RuleVm {
            lua,
            access,
            log,
            home: OnceLock::new(),
        },
        phases,
    ))
}

/// The `routes` list of `main.lua`: the route names its phases run for
/// (`None`: every route).
fn declared_routes(phases: &Table) -> Result<Option<HashSet<String>>, RuleError> {
    match phases.get::<Value>("routes")? {
        Value::Nil => Ok(None),
        Value::Table(list) => {
            let mut routes = HashSet::new();
            for name in list.sequence_values::<Value>() {
                match name? {
                    Value::String(s) => routes.insert(s.to_str()?.to_string()),
                    other => {
                        return Err(RuleError::Invalid(format!(
                            "`routes` must list route names, found a {}",
                            other.type_name()
                        )))
                    }
                };
            }
            Ok(Some(routes))
        }
        other => Err(RuleError::Invalid(format!(
            "`routes` must be a list of route names, got {}",
            other.type_name()
        ))),
    }
}

/// Compiles and validates a rule set; `vms` copies for the proxy threads.
fn compile(
    sources: Sources,
    version: u64,
    vms: usize,
    services: &Arc<HostServices>,
    limits: Limits,
) -> Result<RuleSet, RuleError> {
    let modules = Arc::new(sources.modules.clone());
    let scripts = Arc::new(ScriptSet::new(&sources.scripts));
    let shortcuts = Arc::new(shortcuts::Shortcuts::default());
    // Validation VM: compile, check phases, run selftest once.
    let (probe, phases) = build_vm(
        &sources,
        modules.clone(),
        scripts.clone(),
        services.clone(),
        shortcuts.clone(),
        limits,
    )?;
    let routes = declared_routes(&phases)?;
    if let Value::Function(selftest) = phases.get::<Value>("selftest")? {
        let ok: Value = sandbox::call_sync(&probe.lua, &selftest, (), limits)
            .map_err(|e| RuleError::Invalid(format!("selftest failed: {e}")))?;
        if ok == Value::Boolean(false) {
            return Err(RuleError::Invalid("selftest returned false".into()));
        }
    }
    let mut built = vec![probe];
    while built.len() < vms.max(1) {
        let (vm, _) = build_vm(
            &sources,
            modules.clone(),
            scripts.clone(),
            services.clone(),
            shortcuts.clone(),
            limits,
        )?;
        built.push(vm);
    }
    Ok(RuleSet {
        version,
        hash: sources.hash,
        loaded_at: Utc::now(),
        limits,
        vms: built,
        shortcuts,
        routes,
    })
}

impl RuleSet {
    fn vm(&self) -> &RuleVm {
        let slot = VM_SLOT.with(|s| *s);
        &self.vms[slot % self.vms.len()]
    }

    /// An answer a rule of this version stored for this request with
    /// `seckill.shortcut` (see [`shortcuts`]), to write without running Lua.
    /// A replay counts the decision the answer was stored with.
    pub fn shortcut(&self, route: &str, params: &[(String, String)]) -> Option<Arc<LocalResponse>> {
        let stored = self.shortcuts.find(route, params)?;
        if let Some(counted) = &stored.counted {
            counted.record();
        }
        Some(stored.response)
    }

    /// Whether this rule set's phases run for `route`.
    pub fn handles(&self, route: &str) -> bool {
        self.routes.as_ref().is_none_or(|r| r.contains(route))
    }

    /// Runs the access phase. An error is the rule's fault: the caller
    /// answers 500 for this request only.
    pub async fn access(&self, req: &RequestInfo) -> Result<Decision, RuleError> {
        let vm = self.vm();
        let table = request_table(&vm.lua, req)?;
        let call = sandbox::call_async(&vm.lua, &vm.access, table, self.limits);
        let result: Value = vm
            .on_home_thread(call)
            .await
            .inspect_err(|e| count_error("access", e))?;
        decision(result).inspect_err(|_| {
            metrics::LUA_ERRORS
                .with_label_values(&["access", "bad_return"])
                .inc();
        })
    }

    /// Runs the log phase after the response; failures are only logged.
    pub async fn log(&self, req: &RequestInfo, status: u16, duration_ms: f64) {
        let vm = self.vm();
        let Some(log) = &vm.log else { return };
        let run = async {
            let table = request_table(&vm.lua, req)?;
            let res = vm.lua.create_table()?;
            res.set("status", status)?;
            res.set("duration_ms", duration_ms)?;
            let call = sandbox::call_async::<()>(&vm.lua, log, (table, res), self.limits);
            vm.on_home_thread(call).await
        };
        if let Err(e) = run.await {
            count_error("log", &e);
            tracing::warn!(request_id = %req.request_id, error = %e, "log phase failed");
        }
    }
}

fn count_error(phase: &str, e: &mlua::Error) {
    let text = e.to_string();
    let kind = if text.contains("instruction budget") {
        "budget"
    } else if text.contains("memory") {
        "memory"
    } else {
        "runtime"
    };
    metrics::LUA_ERRORS.with_label_values(&[phase, kind]).inc();
}

fn request_table(lua: &Lua, req: &RequestInfo) -> mlua::Result<Table> {
    // raw_set: the tables are fresh, no metamethods to consult.
    let t = lua.create_table_with_capacity(0, 12)?;
    t.raw_set("request_id", req.request_id.as_str())?;
    t.raw_set("method", req.method.as_str())?;
    t.raw_set("path", req.path.as_str())?;
    t.raw_set("route", req.route.as_str())?;
    t.raw_set("client_ip", req.client_ip.as_str())?;
    let params = lua.create_table_with_capacity(0, req.params.len())?;
    for (k, v) in &req.params {
        params.raw_set(k.as_str(), v.as_str())?;
    }
    t.raw_set("params", params)?;
    let query = lua.create_table()?;
    for (k, v) in form_urlencoded_pairs(&req.query) {
        query.raw_set(k, v)?;
    }
    t.raw_set("query", query)?;
    let headers = lua.create_table_with_capacity(0, req.headers.len())?;
    for (k, v) in &req.headers {
        headers.raw_set(k.as_str(), v.as_str())?;
    }
    t.raw_set("headers", headers)?;
    if let Some(body) = &req.body {
        t.raw_set("body", lua.to_value(body)?)?;
    }
    if let Some(c) = &req.claims {
        let claims = lua.create_table_with_capacity(0, 5)?;
        claims.raw_set("sub", c.sub.as_str())?;
        claims.raw_set("iss", c.iss.as_str())?;
        claims.raw_set("aud", c.aud.as_str())?;
        claims.raw_set("exp", c.exp)?;
        claims.raw_set("username", c.username.as_str())?;
        t.raw_set("claims", claims)?;
        if let Some(uid) = c.user_id() {
            t.raw_set("user_id", uid)?;
        }
    }
    Ok(t)
}

/// `a=1&b=x%20y` → pairs, percent-decoded; malformed escapes kept verbatim.
fn form_urlencoded_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k), percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn decision(v: Value) -> Result<Decision, RuleError> {
    let t = match v {
        Value::Nil => return Ok(Decision::Continue),
        Value::Table(t) if t.get::<bool>(host::RESPONSE_MARK).unwrap_or(false) => t,
        other => {
            return Err(RuleError::Invalid(format!(
                "access must return nothing or seckill.respond/reject(...), got {}",
                other.type_name()
            )))
        }
    };
    let status: u16 = t.get("status")?;
    let body: mlua::LuaString = t.get("body")?;
    let mut headers = Vec::new();
    if let Some(ct) = t.get::<Option<String>>("content_type")? {
        headers.push(("content-type".to_string(), ct));
    }
    if let Some(h) = t.get::<Option<Table>>("headers")? {
        for pair in h.pairs::<String, String>() {
            let (k, v) = pair?;
            let k = k.to_ascii_lowercase();
            if http::HeaderName::from_bytes(k.as_bytes()).is_err()
                || http::HeaderValue::from_str(&v).is_err()
            {
                return Err(RuleError::Invalid(format!("invalid response header `{k}`")));
            }
            headers.retain(|(name, _)| name != &k);
            headers.push((k, v));
        }
    }
    Ok(Decision::Respond(LocalResponse {
        status,
        headers,
        body: Bytes::copy_from_slice(&body.as_bytes()),
    }))
}

/// Status of the loaded rules, for `GET /admin/rules`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RuleStatus {
    pub version: u64,
    pub hash: String,
    pub loaded_at: DateTime<Utc>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub reloads: u64,
}

/// Result of a reload request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reloaded {
    pub version: u64,
    pub hash: String,
    /// False when the files had not changed (nothing was swapped).
    pub changed: bool,
}

/// Owns the current rule set and swaps in new ones.
pub struct RuleEngine {
    dir: PathBuf,
    vms: usize,
    limits: Limits,
    services: Arc<HostServices>,
    current: ArcSwap<RuleSet>,
    status: Mutex<RuleStatus>,
    /// Serialises reloads (file events, SIGHUP and admin can race).
    reload_lock: Mutex<()>,
}

impl RuleEngine {
    /// Loads the initial rule set; a gateway does not start on broken rules.
    pub fn load(
        dir: &Path,
        vms: usize,
        limits: Limits,
        services: Arc<HostServices>,
    ) -> Result<RuleEngine, RuleError> {
        let set = compile(Sources::read_dir(dir)?, 1, vms, &services, limits)?;
        Ok(Self::with_set(dir, set, vms, limits, services))
    }

    /// Starts on a bundle's files (version `version`) instead of the folder.
    pub fn from_files(
        dir: &Path,
        files: RuleFiles,
        version: u64,
        vms: usize,
        limits: Limits,
        services: Arc<HostServices>,
    ) -> Result<RuleEngine, RuleError> {
        let set = compile(Sources::check(files)?, version, vms, &services, limits)?;
        Ok(Self::with_set(dir, set, vms, limits, services))
    }

    fn with_set(
        dir: &Path,
        set: RuleSet,
        vms: usize,
        limits: Limits,
        services: Arc<HostServices>,
    ) -> RuleEngine {
        // Shown as 0 from the start, so a scrape tells "never" from "unknown".
        LazyLock::force(&metrics::LUA_VM_FOREIGN_POLLS);
        let status = RuleStatus {
            version: set.version,
            hash: set.hash.clone(),
            loaded_at: set.loaded_at,
            last_error: None,
            last_error_at: None,
            reloads: 0,
        };
        tracing::info!(version = set.version, hash = %set.hash, dir = %dir.display(), "rules loaded");
        RuleEngine {
            dir: dir.to_path_buf(),
            vms,
            limits,
            services,
            current: ArcSwap::from_pointee(set),
            status: Mutex::new(status),
            reload_lock: Mutex::new(()),
        }
    }

    /// Compiles and selftests `files` as version `version` without
    /// switching to it: the stage step of a bundle push.
    pub fn prepare(&self, files: RuleFiles, version: u64) -> Result<RuleSet, RuleError> {
        compile(
            Sources::check(files)?,
            version,
            self.vms,
            &self.services,
            self.limits,
        )
    }

    /// Switches to a prepared set (the switch step of a bundle push).
    pub fn install(&self, set: RuleSet, trigger: &str) -> Reloaded {
        let _guard = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.swap_in(set, trigger)
    }

    /// Records a refused version (bundle or folder) as the last error.
    pub fn record_refusal(&self, trigger: &str, error: &RuleError) {
        metrics::RULE_RELOADS
            .with_label_values(&[trigger, "refused"])
            .inc();
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        status.last_error = Some(error.to_string());
        status.last_error_at = Some(Utc::now());
        tracing::error!(trigger, error = %error, "rules refused; the current rules keep serving");
    }

    fn swap_in(&self, set: RuleSet, trigger: &str) -> Reloaded {
        let out = Reloaded {
            version: set.version,
            hash: set.hash.clone(),
            changed: true,
        };
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        status.version = set.version;
        status.hash = set.hash.clone();
        status.loaded_at = set.loaded_at;
        status.last_error = None;
        status.reloads += 1;
        self.current.store(Arc::new(set));
        metrics::RULE_RELOADS
            .with_label_values(&[trigger, "ok"])
            .inc();
        tracing::info!(version = out.version, hash = %out.hash, trigger, "rules switched");
        out
    }

    /// The process-wide services every rule set's host API uses.
    pub fn services(&self) -> &Arc<HostServices> {
        &self.services
    }

    /// The rules folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The set a new request should run on (kept by the request to its end).
    pub fn current(&self) -> Arc<RuleSet> {
        self.current.load_full()
    }

    /// Compiles the folder again and swaps it in if it validates. A refused
    /// version leaves the current one serving and is recorded as last_error.
    pub fn reload(&self, trigger: &str) -> Result<Reloaded, RuleError> {
        let _guard = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current();
        let result = Sources::read_dir(&self.dir).and_then(|sources| {
            if sources.hash == current.hash {
                return Ok(None);
            }
            let next = current.version + 1;
            compile(sources, next, self.vms, &self.services, self.limits).map(Some)
        });
        match result {
            Ok(None) => {
                metrics::RULE_RELOADS
                    .with_label_values(&[trigger, "unchanged"])
                    .inc();
                self.status
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .last_error = None;
                Ok(Reloaded {
                    version: current.version,
                    hash: current.hash.clone(),
                    changed: false,
                })
            }
            Ok(Some(set)) => Ok(self.swap_in(set, trigger)),
            Err(e) => {
                self.record_refusal(trigger, &e);
                Err(e)
            }
        }
    }

    pub fn status(&self) -> RuleStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use seckill_contracts::config::Config;

    fn load(files: &[(&str, &str)]) -> Result<RuleEngine, RuleError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("redis")).unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let limits = Limits {
            instruction_budget: 100_000,
            memory_bytes: 8 * 1024 * 1024,
            call_timeout: std::time::Duration::from_secs(1),
        };
        let services = Arc::new(HostServices::new(&Config::default()));
        RuleEngine::load(dir.path(), 1, limits, services)
    }

    #[test]
    fn a_rule_set_cannot_replace_a_compiled_in_script() {
        let main = ("main.lua", "return { access = function(req) end }");
        assert!(load(&[main, ("redis/admit.lua", "return 1")]).is_ok());
        let err = load(&[main, ("redis/release.lua", "return 1")])
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("compiled into the gateway and the workers"),
            "{err}"
        );
    }

    #[test]
    fn declared_routes_limit_where_the_rules_run() {
        let all = load(&[("main.lua", "return { access = function(req) end }")]).unwrap();
        assert!(all.current().handles("anything"), "no list: every route");
        let some = load(&[(
            "main.lua",
            "return { routes = { 'seckill' }, access = function(req) end }",
        )])
        .unwrap();
        assert!(some.current().handles("seckill"));
        assert!(!some.current().handles("sale_detail"));
        for bad in ["routes = 'seckill'", "routes = { 1 }"] {
            let main = format!("return {{ {bad}, access = function(req) end }}");
            let err = load(&[("main.lua", &main)]).err().expect("refused");
            assert!(err.to_string().contains("`routes`"), "{bad}: {err}");
        }
    }
}
