#!/usr/bin/env python3
"""Browser test of the live sale dashboard (/ops) against a running stack.

    python scripts/browser/dashboard.py --gateway URL --admin-token T \
        --sale ID --stock N --demo-cmd 'seckillctl demo --sale ID ...' \
        --rules-dir DIR [--screenshots DIR]

What it does, in a real Chromium (Playwright):

1. opens /ops#sale=ID, enters the admin token, waits for the tiles to show
   the sale untouched (stock left = N);
2. runs --demo-cmd (shell, 120 s at most) while watching the page: the
   stock-left tile must reach 0 and the admissions total must equal N
   (within 15 s of the demo's end), and at least one gateway, api and worker
   row must show live; screenshot ops-dashboard.png with the charts drawn;
3. appends a syntax error to DIR/seckill.lua, clicks "Reload rules": the
   refusal must show the compile errors (naming seckill.lua) and the rules
   version must not change; restores the file (always, even on failure),
   reloads again: success; runs the audit: ok;
4. fails on any console error or page error, except the 422 of
   /ops/api/rules/reload while the broken rule is being reloaded (Chrome
   logs every 4xx answer to fetch as a console error; that one is expected).

Prints one line of JSON (`"ok": true|false`) and exits 0, or 1 on failure
(what failed is in "failed", details on stderr). The whole run is bounded
(TOTAL_BUDGET_S), every wait has its own timeout.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from playwright.sync_api import sync_playwright

TOTAL_BUDGET_S = 145
DEMO_TIMEOUT_S = 120
SETTLE_AFTER_DEMO_S = 15
UI_TIMEOUT_MS = 15_000
AUDIT_TIMEOUT_S = 60
ROLES = ("gateway", "api", "worker")

# Console errors that are expected, by (phase, URL pattern, HTTP status).
ALLOWED_CONSOLE_ERRORS = [
    ("broken-reload", re.compile(r"/ops/api/rules/reload$"), 422),
]

# Appended to seckill.lua in step 3: `local =` does not parse.
BROKEN_RULE = b"\n-- dashboard.py: a deliberate syntax error, removed again by the test\nlocal = \n"


class Failure(Exception):
    """A check that did not hold: the message says which and what was seen."""


class Run:
    """The state of one run: deadline, current phase, console errors."""

    def __init__(self):
        self.started = time.monotonic()
        self.phase = "start"
        self.console = []  # every console error / page error, with its phase
        self.summary = {}

    def left_s(self):
        return TOTAL_BUDGET_S - (time.monotonic() - self.started)

    def budget_ms(self, want_s):
        """A wait of want_s, cut to what is left of the whole run."""
        left = self.left_s() - 3
        if left <= 0:
            raise Failure(f"out of time ({TOTAL_BUDGET_S} s) in phase {self.phase}")
        return int(min(want_s, left) * 1000)

    def step(self, name):
        self.phase = name
        log(f"[{self.elapsed():6.1f}s] {name}")

    def elapsed(self):
        return time.monotonic() - self.started

    # ── console ────────────────────────────────────────────────────────

    def on_console(self, msg):
        if msg.type != "error":
            return
        loc = msg.location or {}
        self.console.append({"phase": self.phase, "text": msg.text, "url": loc.get("url", "")})

    def on_page_error(self, err):
        self.console.append({"phase": self.phase, "text": f"pageerror: {err}", "url": ""})

    def unexpected_console(self):
        return [e for e in self.console if not allowed(e)]


def allowed(entry):
    m = re.search(r"status of (\d{3})", entry["text"])
    status = int(m.group(1)) if m else None
    return any(
        entry["phase"] == phase and url_re.search(entry["url"]) and status == code
        for phase, url_re, code in ALLOWED_CONSOLE_ERRORS
    )


def log(text):
    print(text, file=sys.stderr, flush=True)


# ── page helpers ───────────────────────────────────────────────────────

READ_TILES_JS = """() => {
  const v = id => { const el = document.querySelector(`[data-testid="${id}"]`);
                    return el ? el.getAttribute('data-value') : null; };
  const num = id => { const x = v(id); return x === null || x === '' ? null : Number(x); };
  return {
    stock_left: num('stock-left'),
    admissions_total: num('admissions-total'),
    committed: num('committed'),
    rules_version: v('rules-version'),
    rows: Array.from(document.querySelectorAll('[data-testid="process-row"]'))
      .map(r => ({role: r.dataset.role, live: r.dataset.live === 'true'})),
  };
}"""

RESULT_DONE_JS = """([id]) => {
  const el = document.querySelector(`[data-testid="${id}"]`);
  const s = el && el.getAttribute('data-state');
  return s && s !== 'busy';
}"""


def read_tiles(page):
    return page.evaluate(READ_TILES_JS)


def live_roles(tiles):
    return sorted({r["role"] for r in tiles["rows"] if r["live"]})


def wait_result(run, page, testid, timeout_s):
    """Waits until an action's result area has a final state; returns it."""
    page.wait_for_function(RESULT_DONE_JS, arg=[testid], timeout=run.budget_ms(timeout_s))
    el = page.get_by_test_id(testid)
    return el.get_attribute("data-state"), el.inner_text()


def screenshot(page, directory, name):
    path = os.path.join(directory, name)
    page.screenshot(path=path, full_page=True)
    return path


# ── steps ──────────────────────────────────────────────────────────────

def open_dashboard(run, page, args):
    run.step("open")
    page.goto(f"{args.gateway}/ops#sale={args.sale}", wait_until="load", timeout=run.budget_ms(15))
    token = page.get_by_test_id("token-input")
    token.wait_for(state="visible", timeout=run.budget_ms(10))
    token.fill(args.admin_token)
    token.press("Enter")
    try:
        page.wait_for_function(
            """([n]) => { const el = document.querySelector('[data-testid="stock-left"]');
                          return el && el.getAttribute('data-value') === String(n); }""",
            arg=[args.stock], timeout=run.budget_ms(20))
    except Exception:
        raise Failure(f"stock-left never showed {args.stock}: tiles {read_tiles(page)}, "
                      f"freshness {page.locator('#freshness').inner_text()!r}")
    chosen = page.get_by_test_id("sale-select").input_value()
    if chosen != str(args.sale):
        raise Failure(f"sale chooser shows {chosen!r}, not {args.sale}")
    run.summary["opened_s"] = round(run.elapsed(), 1)


def run_demo(run, page, args, shots):
    run.step("demo")
    out = tempfile.TemporaryFile()
    started = time.monotonic()
    # Its own session, so a timeout ends the demo and whatever it started.
    proc = subprocess.Popen(args.demo_cmd, shell=True, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    min_stock, max_adm, roles_seen = None, None, set()
    try:
        while proc.poll() is None:
            if time.monotonic() - started > DEMO_TIMEOUT_S or run.left_s() < 20:
                raise Failure(f"demo still running after {time.monotonic() - started:.0f} s")
            t = read_tiles(page)
            if t["stock_left"] is not None:
                min_stock = t["stock_left"] if min_stock is None else min(min_stock, t["stock_left"])
            if t["admissions_total"] is not None:
                max_adm = t["admissions_total"] if max_adm is None else max(max_adm, t["admissions_total"])
            roles_seen.update(live_roles(t))
            page.wait_for_timeout(250)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    demo_s = time.monotonic() - started
    out.seek(0)
    output = out.read().decode("utf-8", "replace")
    if proc.returncode != 0:
        # The head names the error; a backtrace would bury it at the tail.
        shown = output if len(output) <= 1600 else output[:1000] + "\n[...]\n" + output[-500:]
        raise Failure(f"demo command exited {proc.returncode}: {shown}")
    run.summary["demo_s"] = round(demo_s, 1)

    run.step("settle")
    try:
        page.wait_for_function(
            """([n]) => {
              const v = id => document.querySelector(`[data-testid="${id}"]`).getAttribute('data-value');
              return v('stock-left') === '0' && v('admissions-total') === String(n);
            }""", arg=[args.stock], timeout=run.budget_ms(SETTLE_AFTER_DEMO_S))
    except Exception:
        raise Failure(f"within {SETTLE_AFTER_DEMO_S} s of the demo the tiles did not show stock 0 and "
                      f"{args.stock} admissions: {read_tiles(page)} (lowest stock seen {min_stock}, "
                      f"most admissions seen {max_adm})")
    tiles = read_tiles(page)
    missing = [r for r in ROLES if r not in live_roles(tiles)]
    if missing:
        page.wait_for_timeout(run.budget_ms(3))
        tiles = read_tiles(page)
        missing = [r for r in ROLES if r not in live_roles(tiles)]
    if missing:
        raise Failure(f"no live process row for {missing}: rows {tiles['rows']}")
    run.summary.update(stock_left=tiles["stock_left"], admissions_total=tiles["admissions_total"],
                       committed=tiles["committed"], live_roles=live_roles(tiles),
                       process_rows=len(tiles["rows"]))
    # A couple more samples so the charts have drawn the sell-out.
    page.wait_for_timeout(run.budget_ms(2))
    run.summary["screenshot"] = screenshot(page, shots, "ops-dashboard.png")
    check_narrow(run, page, shots)


def check_narrow(run, page, shots):
    """At 390 px wide (a phone) nothing may stick out sideways."""
    run.step("narrow")
    size = page.viewport_size
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(run.budget_ms(1))
    width = page.evaluate("document.documentElement.scrollWidth")
    run.summary["screenshot_390"] = screenshot(page, shots, "ops-dashboard-390.png")
    page.set_viewport_size(size)
    if width > 392:
        raise Failure(f"at 390 px the page is {width} px wide (sideways scrolling)")


def reload_rules(run, page, args):
    seckill_lua = os.path.join(args.rules_dir, "seckill.lua")
    if not os.path.isfile(seckill_lua):
        raise Failure(f"no {seckill_lua}")
    run.step("rules-version")
    page.wait_for_function(
        """() => { const v = document.querySelector('[data-testid="rules-version"]').getAttribute('data-value');
                   return v !== null && v !== ''; }""", timeout=run.budget_ms(10))
    before = read_tiles(page)["rules_version"]
    run.summary["rules_version"] = before

    with open(seckill_lua, "rb") as f:
        original = f.read()
    try:
        with open(seckill_lua, "wb") as f:  # same inode and mode: the watcher sees a change
            f.write(original + BROKEN_RULE)
        run.step("broken-reload")
        page.get_by_test_id("reload-button").click(timeout=run.budget_ms(5))
        state, text = wait_result(run, page, "reload-result", 20)
        if state != "refused":
            raise Failure(f"a broken seckill.lua was not refused: {state}: {text!r}")
        errors = page.get_by_test_id("reload-errors")
        if not errors.is_visible():
            raise Failure("refused, but no compile errors shown")
        error_text = errors.inner_text()
        if "seckill.lua" not in error_text:
            raise Failure(f"compile errors do not name seckill.lua: {error_text!r}")
        # Two more polls: the version the gateways report must be the old one.
        page.wait_for_timeout(run.budget_ms(2.2))
        after = read_tiles(page)["rules_version"]
        if after != before:
            raise Failure(f"rules version changed from {before} to {after} although the reload was refused")
        run.summary["reload_refused"] = {"result": text, "errors": error_text[:300]}
    finally:
        with open(seckill_lua, "wb") as f:
            f.write(original)

    run.step("restored-reload")
    page.get_by_test_id("reload-button").click(timeout=run.budget_ms(5))
    state, text = wait_result(run, page, "reload-result", 20)
    if state != "ok":
        raise Failure(f"reload of the restored rules did not succeed: {state}: {text!r}")
    if page.get_by_test_id("reload-errors").is_visible():
        raise Failure("compile errors still shown after a successful reload")
    run.summary["reload_restored"] = text


def audit(run, page):
    run.step("audit")
    page.get_by_test_id("audit-button").click(timeout=run.budget_ms(5))
    state, text = wait_result(run, page, "audit-result", AUDIT_TIMEOUT_S)
    ok = page.get_by_test_id("audit-result").get_attribute("data-ok")
    if state != "ok" or ok != "true":
        violations = page.locator('[data-testid="audit-result"] li').all_inner_texts()
        head = text.splitlines()[0] if text else ""
        raise Failure(f"audit not ok: {state}: {head!r}, violations {violations}")
    run.summary["audit"] = text.splitlines()[0] if text else ""


# ── main ───────────────────────────────────────────────────────────────

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gateway", required=True, help="gateway base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--admin-token", required=True)
    p.add_argument("--sale", required=True, type=int)
    p.add_argument("--stock", required=True, type=int, help="the sale's stock (it must be untouched)")
    p.add_argument("--demo-cmd", required=True, help="shell command that buys the sale out")
    p.add_argument("--rules-dir", required=True, help="the gateways' rules folder (holds seckill.lua)")
    p.add_argument("--screenshots", help="folder for the screenshots (default: a new temp folder)")
    p.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    args = p.parse_args(argv)
    args.gateway = args.gateway.rstrip("/")
    return args


def on_alarm(signum, frame):
    raise Failure(f"whole run over {TOTAL_BUDGET_S + 4} s")


def main(argv):
    args = parse_args(argv)
    shots = args.screenshots or tempfile.mkdtemp(prefix="ops-dashboard-")
    os.makedirs(shots, exist_ok=True)
    run = Run()
    # Last resort if a browser call hangs past every timeout: the rules
    # file is still restored (finally blocks run), the run still reports.
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TOTAL_BUDGET_S + 4)
    failed = None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.on("console", run.on_console)
        page.on("pageerror", run.on_page_error)
        try:
            open_dashboard(run, page, args)
            run_demo(run, page, args, shots)
            reload_rules(run, page, args)
            audit(run, page)
            run.step("console")
            bad = run.unexpected_console()
            if bad:
                raise Failure(f"console errors: {bad}")
        except Failure as e:
            failed = str(e)
        except Exception as e:  # a Playwright timeout or crash: still one report
            failed = f"{type(e).__name__}: {e}"
        if failed:
            try:
                run.summary["failure_screenshot"] = screenshot(page, shots, "ops-dashboard-failure.png")
            except Exception:
                pass
        browser.close()
    signal.alarm(0)
    run.summary.update(
        ok=failed is None,
        elapsed_s=round(run.elapsed(), 1),
        console_errors=len(run.console),
        console_errors_allowed=len(run.console) - len(run.unexpected_console()),
    )
    if failed:
        run.summary.update(failed=failed, phase=run.phase)
        log(f"dashboard.py FAILED in phase {run.phase}: {failed}")
        if run.console:
            log("console errors: " + json.dumps(run.console))
    print(json.dumps(run.summary, sort_keys=True), flush=True)
    return 0 if failed is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
