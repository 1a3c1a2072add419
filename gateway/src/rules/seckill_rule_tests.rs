//! The shipped `lua/seckill.lua`, run in a real sandboxed VM with its host
//! functions scripted, so every hand-off outcome can be forced and the
//! buyer's answer checked: each says what is true.
//!
//! The end-to-end tests drive the same rule through the real gateway,
//! Redis and RabbitMQ; what they cannot force on demand (a rollback that
//! fails, a reservation a worker settled in between) is forced here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mlua::{Function, Lua, Table};

use super::sandbox::{call_sync, new_vm, Limits};

const LIMITS: Limits = Limits {
    instruction_budget: 1_000_000,
    memory_bytes: 16 * 1024 * 1024,
    call_timeout: Duration::from_secs(5),
};

/// Host functions that answer as the scenario says. `ENQUEUE` is what the
/// hand-off reports; `PUBLISH_OK` and `RELEASE` drive a rule that does its
/// own publish and rollback instead.
const HOST: &str = r#"
seckill = {
  sale = function(id)
    if SALE == false then return nil end
    return SALE or { id = id, ready = true, starts_at_ms = 0, ends_at_ms = 2^52,
                     stock_total = 10, sold_out = false }
  end,
  now_ms = function() return 1000 end,
  bucket = function() return BUCKET ~= false end,
  sale_keys = function()
    return { info = "i", stock = "s", buyers = "b", reservations = "r",
             released = "x", path = "p", limit = "l", result = "o" }
  end,
  redis = function(name)
    if name == "admit" then
      if ADMIT == "error" then error("redis is down") end
      return ADMIT or { "admitted", 1000, STOCK_LEFT }
    end
    if name == "release" then
      if RELEASE == "error" then error("redis is down") end
      return RELEASE
    end
    error("unexpected script " .. name)
  end,
  publish = function() return PUBLISH_OK, "broker is down" end,
  enqueue = function() return ENQUEUE, "broker is down", 70 end,
  sale_event = function() end,
  shortcut = function(route, param, value, answer, ttl, outcome, sale_id)
    STORED = { outcome = outcome, sale_id = sale_id }
  end,
  decision = function(outcome, sale_id)
    DECISIONS = (DECISIONS or 0) + 1
    DECIDED = outcome
    DECIDED_SALE = sale_id
  end,
  shortcut_clear = function() CLEARED = true end,
  counter = function() end,
  log = function() end,
  respond = function(status, body, headers)
    return { status = status, body = body, headers = headers or {} }
  end,
  reject = function(status, detail, headers)
    return { status = status, detail = detail, headers = headers or {} }
  end,
}
"#;

struct Answer {
    status: u16,
    detail: String,
    retry_after: Option<String>,
    /// What the rule counted with `seckill.decision`: how many calls, the
    /// last outcome and sale id.
    decisions: u32,
    decided: Option<String>,
    decided_sale: Option<u64>,
    /// The outcome a stored shortcut answer carries.
    stored_outcome: Option<String>,
}

/// Runs `access` of the repository's seckill rule for one admitted buyer.
fn admit_with(enqueue: &str, publish_ok: bool, release: &str, stock_left: i64) -> Answer {
    run_rule(
        &format!(
            "ENQUEUE = '{enqueue}'\nPUBLISH_OK = {publish_ok}\nRELEASE = {release}\n\
             STOCK_LEFT = {stock_left}"
        ),
        "7",
        &"a".repeat(32),
    )
}

/// Runs `access` of the repository's seckill rule with the host scripted
/// by `scenario` (Lua setting the globals HOST reads) for one request.
fn run_rule(scenario: &str, sale_id: &str, path: &str) -> Answer {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../lua");
    let source = std::fs::read_to_string(dir.join("seckill.lua")).unwrap();
    let modules = Arc::new(BTreeMap::from([("seckill".to_string(), source)]));
    let lua: Lua = new_vm(modules, LIMITS).unwrap();
    let setup = format!("{HOST}\n{scenario}\nreturn require('seckill').access");
    let chunk = lua.load(setup).into_function().unwrap();
    let access: Function = call_sync(&lua, &chunk, (), LIMITS).unwrap();
    let req = lua.create_table().unwrap();
    let params = lua.create_table().unwrap();
    params.set("sale_id", sale_id).unwrap();
    params.set("path", path).unwrap();
    req.set("params", params).unwrap();
    req.set("user_id", 42).unwrap();
    req.set("request_id", "rid-1").unwrap();
    req.set("route", "seckill").unwrap();
    let answer: Table = call_sync(&lua, &access, req, LIMITS).unwrap();
    let headers: Table = answer.get("headers").unwrap();
    Answer {
        status: answer.get("status").unwrap(),
        detail: answer
            .get::<Option<String>>("detail")
            .unwrap()
            .unwrap_or_default(),
        retry_after: headers.get("retry-after").unwrap(),
        decisions: lua
            .globals()
            .get::<Option<u32>>("DECISIONS")
            .unwrap()
            .unwrap_or(0),
        decided: lua.globals().get("DECIDED").unwrap(),
        decided_sale: lua.globals().get("DECIDED_SALE").unwrap(),
        stored_outcome: lua
            .globals()
            .get::<Option<Table>>("STORED")
            .unwrap()
            .and_then(|t| t.get("outcome").unwrap()),
    }
}

/// How to make the shipped rule give each outcome of
/// `seckill_contracts::admission_answers`: (outcome, scenario, sale id, path).
const SCENARIOS: &[(&str, &str, &str, &str)] = &[
    ("bad_sale_id", "", "0x7", HEX32),
    ("malformed_path", "", "7", "not-hex"),
    ("unknown_sale", "SALE = false", "7", HEX32),
    (
        "not_started",
        "SALE = { id = 7, ready = true, starts_at_ms = 4000, ends_at_ms = 9000, sold_out = false }",
        "7",
        HEX32,
    ),
    (
        "ended",
        "SALE = { id = 7, ready = true, starts_at_ms = 0, ends_at_ms = 500, sold_out = false }",
        "7",
        HEX32,
    ),
    (
        "sold_out",
        "SALE = { id = 7, ready = true, starts_at_ms = 0, ends_at_ms = 2^52, sold_out = true }",
        "7",
        HEX32,
    ),
    // The store re-checks the window and the stock: same answers.
    ("not_started", "ADMIT = { 'not_started' }", "7", HEX32),
    ("ended", "ADMIT = { 'ended' }", "7", HEX32),
    ("sold_out", "ADMIT = { 'sold_out' }", "7", HEX32),
    ("gateway_limited", "BUCKET = false", "7", HEX32),
    ("store_unavailable", "ADMIT = 'error'", "7", HEX32),
    ("not_ready", "ADMIT = { 'not_ready' }", "7", HEX32),
    ("bad_path", "ADMIT = { 'bad_path' }", "7", HEX32),
    ("duplicate", "ADMIT = { 'duplicate' }", "7", HEX32),
    ("limited", "ADMIT = { 'limited', 1500 }", "7", HEX32),
    ("queued", "ENQUEUE = 'queued'; STOCK_LEFT = 3", "7", HEX32),
    (
        "released",
        "ENQUEUE = 'released'; STOCK_LEFT = 3",
        "7",
        HEX32,
    ),
    (
        "not_held",
        "ENQUEUE = 'not_held'; STOCK_LEFT = 3",
        "7",
        HEX32,
    ),
    (
        "release_failed",
        "ENQUEUE = 'release_failed'; STOCK_LEFT = 3",
        "7",
        HEX32,
    ),
];

const HEX32: &str = "0123456789abcdef0123456789abcdef";

/// The OpenAPI document describes this route from `ANSWERS`: the shipped
/// rule must answer exactly what the table says, outcome by outcome, and
/// the table must not list an outcome the rule never gives.
#[test]
fn the_rule_answers_exactly_what_the_documented_table_says() {
    use seckill_contracts::admission_answers::{answer_for, ANSWERS};
    for (outcome, scenario, sale_id, path) in SCENARIOS {
        let documented =
            answer_for(outcome).unwrap_or_else(|| panic!("{outcome} is not in ANSWERS"));
        let got = run_rule(scenario, sale_id, path);
        assert_eq!(got.status, documented.status, "{outcome}");
        let retry = got
            .retry_after
            .as_deref()
            .map(|r| r.parse::<u64>().expect("Retry-After is whole seconds"));
        assert_eq!(
            retry.is_some(),
            documented.retry_after,
            "{outcome}: Retry-After"
        );
        let detail = documented.detail_for(7, retry.unwrap_or(0));
        assert_eq!(got.detail, detail, "{outcome}");
        // Counted once, under its own name, for the sale when it is one.
        assert_eq!(got.decisions, 1, "{outcome}: decisions counted");
        assert_eq!(got.decided.as_deref(), Some(*outcome), "{outcome}");
        let named_sale = !matches!(*outcome, "bad_sale_id" | "unknown_sale");
        assert_eq!(got.decided_sale, named_sale.then_some(7), "{outcome}: sale");
        if let Some(stored) = &got.stored_outcome {
            assert_eq!(stored, outcome, "a stored answer replays its own outcome");
        }
    }
    let mut scripted: Vec<_> = SCENARIOS.iter().map(|s| s.0).collect();
    let mut documented: Vec<_> = ANSWERS.iter().map(|a| a.outcome).collect();
    scripted.sort_unstable();
    scripted.dedup();
    documented.sort_unstable();
    assert_eq!(
        scripted, documented,
        "every documented outcome is exercised"
    );
}

#[test]
fn a_confirmed_or_claimed_order_is_queued() {
    assert_eq!(admit_with("queued", true, "0", 3).status, 202);
    assert_eq!(admit_with("claimed", false, "-1", 3).status, 202);
}

#[test]
fn a_given_back_unit_says_nothing_is_reserved() {
    let a = admit_with("released", false, "1", 3);
    assert_eq!(a.status, 503);
    assert!(a.detail.contains("nothing was reserved"), "{}", a.detail);
    assert_eq!(a.retry_after.as_deref(), Some("1"));
}

#[test]
fn a_failed_rollback_does_not_claim_nothing_was_reserved() {
    let a = admit_with("release_failed", false, "'error'", 3);
    assert_eq!(a.status, 503);
    assert!(!a.detail.contains("nothing was reserved"), "{}", a.detail);
    assert!(
        a.detail.contains("released automatically within 70 s"),
        "{}",
        a.detail
    );
    assert_eq!(
        a.retry_after.as_deref(),
        Some("70"),
        "retry once the sweeper gave it back"
    );
}

#[test]
fn a_reservation_no_longer_held_points_to_the_result() {
    let a = admit_with("not_held", false, "0", 3);
    assert_eq!(a.status, 503);
    assert!(!a.detail.contains("nothing was reserved"), "{}", a.detail);
    assert!(a.detail.contains("/api/v1/sales/7/result"), "{}", a.detail);
}
