#!/usr/bin/env python3
"""The buyer storefront (web/index.html, web/store/) in a real browser.

    storefront.py --gateway http://127.0.0.1:8080 --redis-url redis://127.0.0.1:6379/ \\
        --captcha-key 'PFX:{sale:SALE}:captcha:USER' --sale 7 [--screenshots DIR]

--sale must open a few seconds (5 to 15) after the script starts, with stock 1.
Two buyers race for that one unit through the UI only:

  A (desktop 1280x900): registers, logs out, logs in; opens the list, then the
    sale; sees the countdown and a disabled buy button; the button enables
    itself at the start and the captcha appears; answers it (the answer is
    read from Redis, as a test cannot read the PNG); buys; sees success with
    the order id; pays the order in My orders.
  B (390x844): registers (which logs in); opens the same sale before A buys;
    answers the captcha after A bought; is refused "sold out" in words; the
    page never scrolls sideways.

Every console error and page error fails the run, except Chrome's "Failed to
load resource" for a request a step expects to be refused, listed per step as
(URL regex, status). Prints one JSON line; exits 0 when every step passed,
else 1 with the step, what was expected, what was seen and the console errors.
"""

import argparse
import json
import os
import re
import secrets
import signal
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import redis
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import sync_playwright

# The whole run, start to summary; every wait below has its own, shorter limit.
BUDGET_S = 85
UI_TIMEOUT_MS = 10_000
# From the script's start: the sale opens within 15 s, so its button must
# enable within this long or the countdown is broken.
OPEN_TIMEOUT_MS = 30_000
RESULT_TIMEOUT_MS = 20_000
PASSWORD = "storefront-pw-1"
FAILED_LOAD = re.compile(r"Failed to load resource: the server responded with a status of (\d{3})")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class StepFailed(Exception):
    def __init__(self, step, expected, seen):
        super().__init__(f"{step}: expected {expected}, saw {seen}")
        self.step, self.expected, self.seen = step, expected, seen


class Console:
    """Console and page errors of every page, with a per-step allow-list per page."""

    def __init__(self):
        self.errors = []
        self.allowed = []
        self._allow = {}

    def watch(self, page, who):
        self._allow[who] = []
        page.on("console", lambda msg: self._on_console(who, msg))
        page.on("pageerror", lambda exc: self.errors.append({"page": who, "kind": "pageerror", "text": str(exc)}))

    def _on_console(self, who, msg):
        if msg.type != "error":
            return
        url = (msg.location or {}).get("url", "")
        entry = {"page": who, "kind": "console", "text": msg.text, "url": url}
        failed = FAILED_LOAD.search(msg.text)
        if failed:
            status = int(failed.group(1))
            for pattern, allowed_status in self._allow[who]:
                if status == allowed_status and re.search(pattern, url):
                    self.allowed.append(entry)
                    return
        self.errors.append(entry)

    @contextmanager
    def expect_refused(self, page, who, allow):
        """Within the block, `who` may see exactly these refusals: [(URL regex, status)]."""
        self._allow[who] = list(allow)
        try:
            yield
            # Console events arrive with the next round trip; let them land
            # while the allow-list still applies.
            page.wait_for_timeout(300)
        finally:
            self._allow[who] = []


class Run:
    def __init__(self, args):
        self.args = args
        self.started = time.monotonic()
        self.steps = []
        self.console = Console()
        self.redis = redis.Redis.from_url(args.redis_url, socket_timeout=5)
        self.shots = Path(args.screenshots) if args.screenshots else None
        self.pages = {}
        self.current = "start"

    @contextmanager
    def step(self, name):
        began = time.monotonic()
        self.current = name
        yield
        self.steps.append({"step": name, "ms": round((time.monotonic() - began) * 1000)})

    def fail(self, expected, seen):
        raise StepFailed(self.current, expected, seen)

    def check(self, ok, expected, seen):
        if not ok:
            self.fail(expected, seen)

    def wait(self, what, fn, *a, **kw):
        """Runs one Playwright wait; a timeout becomes this step's failure."""
        try:
            return fn(*a, **kw)
        except PlaywrightError as err:
            self.fail(what, str(err).splitlines()[0][:300])

    def captcha_answer(self, user_id):
        key = re.sub(r"\bSALE\b", str(self.args.sale), self.args.captcha_key)
        key = re.sub(r"\bUSER\b", str(user_id), key)
        value = self.redis.get(key)
        self.check(value is not None, f"a captcha answer in Redis at {key}", "no such key")
        return value.decode()

    def screenshot(self, page, name):
        if self.shots:
            self.shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(self.shots / name), full_page=True)


def register(run, page, username, *, then_log_in_again):
    page.goto(f"{run.args.gateway}/#/register", wait_until="domcontentloaded")
    run.wait("the register form", page.get_by_test_id("register-username").wait_for)
    page.get_by_test_id("register-username").fill(username)
    page.get_by_test_id("register-password").fill(PASSWORD)
    page.get_by_test_id("register-password").press("Enter")
    run.wait("logged in after registering", page.get_by_test_id("nav-user").wait_for)
    if then_log_in_again:
        page.get_by_test_id("logout-button").click()
        page.get_by_test_id("login-link").click()
        run.wait("the login form", page.get_by_test_id("login-username").wait_for)
        page.get_by_test_id("login-username").fill(username)
        page.get_by_test_id("login-password").fill(PASSWORD)
        page.get_by_test_id("login-submit").click()
        run.wait("logged in through the login form", page.get_by_test_id("nav-user").wait_for)
    shown = page.get_by_test_id("nav-user")
    run.check(shown.inner_text() == username, f"the header to name {username}", shown.inner_text())
    stored = page.evaluate("() => JSON.parse(sessionStorage.getItem('storefront.session') || 'null')")
    run.check(stored and stored.get("token"), "the token in sessionStorage", stored)
    user_id = int(shown.get_attribute("data-user-id"))
    run.check(user_id == stored.get("userId"), "the page and sessionStorage to agree on the user id", (user_id, stored))
    return user_id


def open_sale_from_list(run, page):
    page.get_by_role("link", name="Sales", exact=True).click()
    card = page.locator(f'[data-testid="sale-card"][data-sale-id="{run.args.sale}"]')
    run.wait(f"sale {run.args.sale} in the sales list", card.wait_for)
    card.click()
    run.wait("the sale page", page.get_by_test_id("sale-page").wait_for)
    # "checking" is the page looking up the buyer's own result; then it settles.
    run.wait(
        "the sale page to settle",
        page.wait_for_function,
        "() => { const p = document.querySelector('[data-testid=sale-page]');"
        " return p && p.dataset.phase && p.dataset.phase !== 'checking'; }",
        timeout=UI_TIMEOUT_MS,
    )
    return page.get_by_test_id("sale-page").get_attribute("data-phase")


def wait_for_open_captcha(run, page):
    run.wait(
        "the buy button to enable itself at the start",
        page.wait_for_function,
        "() => { const b = document.querySelector('[data-testid=buy-button]'); return b && !b.disabled; }",
        timeout=OPEN_TIMEOUT_MS,
    )
    run.wait(
        "the captcha picture",
        page.wait_for_function,
        "() => { const i = document.querySelector('[data-testid=captcha-img]');"
        " return i && i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0; }",
        timeout=UI_TIMEOUT_MS,
    )


def no_sideways_scroll(run, page, where):
    width = page.evaluate("() => document.documentElement.scrollWidth")
    run.check(width <= 390, f"no horizontal scroll at 390 px on {where}", f"scrollWidth {width}")


def buyer_a_arrives(run, browser):
    with run.step("A: register and log in (desktop)"):
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        ctx.set_default_timeout(UI_TIMEOUT_MS)
        page = ctx.new_page()
        run.pages["A"] = page
        run.console.watch(page, "A")
        run.user_a = f"buyer_a_{secrets.token_hex(4)}"
        run.uid_a = register(run, page, run.user_a, then_log_in_again=True)
    with run.step("A: sales list → sale page before the start"):
        phase = open_sale_from_list(run, page)
        run.check(phase == "upcoming", "the sale not open yet (phase upcoming)", phase)
        countdown = page.get_by_test_id("countdown")
        run.check(
            countdown.is_visible() and re.match(r"^(\d+d )?\d\d:\d\d:\d\d$", countdown.inner_text()),
            "a visible countdown hh:mm:ss",
            countdown.inner_text(),
        )
        run.check(
            page.get_by_test_id("buy-button").is_disabled(), "the buy button disabled before the start", "enabled"
        )
    return page


def buyer_b_arrives(run, browser):
    with run.step("B: register (390 px) and open the sale"):
        ctx = browser.new_context(
            viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True
        )
        ctx.set_default_timeout(UI_TIMEOUT_MS)
        page = ctx.new_page()
        run.pages["B"] = page
        run.console.watch(page, "B")
        run.uid_b = register(run, page, f"buyer_b_{secrets.token_hex(4)}", then_log_in_again=False)
        run.wait("the sales list", page.get_by_test_id("sale-card").first.wait_for)
        no_sideways_scroll(run, page, "the sales list")
        phase = open_sale_from_list(run, page)
        run.check(phase in ("upcoming", "open"), "the sale upcoming or open for B", phase)
        no_sideways_scroll(run, page, "the sale page")
    return page


class HeldRequests:
    """Holds a page's requests matching a pattern until released (unchanged, only later).

    The hidden path is refused once a sale is sold out, so a buyer can only be
    told "sold out" by the seckill itself when they got their path first and
    someone else's order landed in between: B's seckill POST waits here while
    A buys, which is that race, in a fixed order.
    """

    def __init__(self, page, pattern):
        self.page, self.pattern, self.routes = page, pattern, []
        page.route(pattern, self._hold)

    def _hold(self, route):
        self.routes.append(route)

    def wait_held(self, run, what, timeout_ms=UI_TIMEOUT_MS):
        deadline = time.monotonic() + timeout_ms / 1000
        while not self.routes:
            run.check(time.monotonic() < deadline, what, "no such request")
            self.page.wait_for_timeout(50)

    def release(self):
        for route in self.routes:
            route.continue_()
        self.page.unroute(self.pattern)


SECKILL_POST = re.compile(r"/api/v1/seckill/[0-9a-f]{32}/\d+$")


def buyer_b_gets_path(run, page):
    with run.step("B: countdown opens the sale, captcha, buy (its seckill POST held)"):
        wait_for_open_captcha(run, page)
        run.held = HeldRequests(page, SECKILL_POST)
        page.get_by_test_id("captcha-answer").fill(run.captcha_answer(run.uid_b))
        page.get_by_test_id("buy-button").click()
        run.held.wait_held(run, "B's seckill POST, after its captcha answer was taken")


def buyer_a_buys(run, page):
    with run.step("A: countdown opens the sale, captcha, buy"):
        wait_for_open_captcha(run, page)
        page.get_by_test_id("captcha-answer").fill(run.captcha_answer(run.uid_a))
        page.get_by_test_id("captcha-answer").press("Enter")  # the form submits with Enter
        success = page.locator('[data-testid="sale-message"][data-state="success"]')
        run.wait("success with the order id", success.wait_for, timeout=RESULT_TIMEOUT_MS)
        order_id = page.get_by_test_id("order-id").inner_text().strip()
        run.check(UUID.match(order_id), "an order id (UUID)", order_id)
        run.order_id = order_id
        run.screenshot(page, "storefront-desktop.png")


def buyer_b_refused(run, page):
    with run.step("B: seckill POST lands after A's order, refused as sold out"):
        with run.console.expect_refused(page, "B", [(SECKILL_POST.pattern, 410)]):
            run.held.release()
            message = page.locator('[data-testid="sale-message"]:not([data-state="info"])')
            run.wait("a refusal message", message.wait_for, timeout=RESULT_TIMEOUT_MS)
            text = message.inner_text()
            run.check(
                message.get_attribute("data-state") == "refusal" and "sold out" in text.lower(),
                "the refusal 'sold out' in words",
                f"[{message.get_attribute('data-state')}] {text}",
            )
            run.check(
                page.get_by_test_id("buy-button").is_disabled(), "the buy button disabled after sold out", "enabled"
            )
        no_sideways_scroll(run, page, "the refusal")
        run.screenshot(page, "storefront-mobile.png")


def top_up(run, user_id, cents):
    """Ops top A's wallet up (the wallet's admin route, not the storefront)."""
    body = json.dumps({"user_id": user_id, "amount_cents": cents}).encode()
    request = urllib.request.Request(
        f"{run.args.wallet_url}/admin/wallet/credit",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {run.args.admin_token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        run.check(r.status == 200, "the top-up accepted", r.status)


def buyer_a_pays(run, page):
    with run.step("A: My orders → pay"):
        top_up(run, run.uid_a, 100_000)
        page.get_by_test_id("nav-orders").click()
        wallet = page.get_by_test_id("wallet-balance")
        run.wait("A's wallet balance", wallet.wait_for)
        run.check("1,000.00" in wallet.inner_text() or "1000.00" in wallet.inner_text(),
                  "the balance topped up shown", wallet.inner_text())
        row = page.locator(f'[data-testid="order-row"][data-order-id="{run.order_id}"]')
        run.wait("the new order in My orders", row.wait_for)
        status = row.get_by_test_id("order-status").inner_text()
        run.check(row.get_attribute("data-status") == "unpaid" and status == "Unpaid", "the order unpaid", status)
        row.get_by_test_id("pay-button").click()
        run.wait(
            "the order paid",
            page.wait_for_function,
            f"() => document.querySelector('[data-testid=order-row][data-order-id=\"{run.order_id}\"]')"
            "?.dataset.status === 'paid'",
            timeout=UI_TIMEOUT_MS,
        )
        status = row.get_by_test_id("order-status").inner_text()
        run.check(status == "Paid", "the order shown paid", status)
        run.check(row.get_by_test_id("pay-button").count() == 0, "no pay button on a paid order", "still there")


def summary(run, ok, **extra):
    out = {
        "ok": ok,
        "elapsed_ms": round((time.monotonic() - run.started) * 1000),
        "steps": run.steps,
        "console_errors": run.console.errors,
        "allowed_refusals": [e["url"] for e in run.console.allowed],
    }
    out.update(extra)
    print(json.dumps(out), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--captcha-key", required=True, help="with SALE and USER in place of the ids")
    parser.add_argument("--sale", required=True, type=int)
    parser.add_argument("--screenshots")
    parser.add_argument("--wallet-url", required=True, help="the wallet's admin route tops A up")
    parser.add_argument("--admin-token", required=True)
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args()
    args.gateway = args.gateway.rstrip("/")
    run = Run(args)

    def out_of_time(_sig, _frame):
        # Playwright may be mid-wait: report and leave at once rather than
        # trust a clean shutdown from inside a signal handler.
        summary(
            run,
            False,
            step=getattr(run, "current", "start"),
            expected=f"the run to end within {BUDGET_S} s",
            seen="still running",
        )
        os._exit(1)

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(BUDGET_S)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"], headless=True)
            try:
                page_a = buyer_a_arrives(run, browser)
                page_b = buyer_b_arrives(run, browser)
                buyer_b_gets_path(run, page_b)
                buyer_a_buys(run, page_a)
                buyer_b_refused(run, page_b)
                buyer_a_pays(run, page_a)
                with run.step("console: no errors"):
                    page_a.wait_for_timeout(300)
                    run.check(not run.console.errors, "no console or page errors", len(run.console.errors))
            except StepFailed:
                for who, page in run.pages.items():
                    try:
                        run.screenshot(page, f"failure-{who}.png")
                    except PlaywrightError:
                        pass
                raise
            finally:
                browser.close()
    except StepFailed as failed:
        summary(run, False, step=failed.step, expected=failed.expected, seen=failed.seen)
        return 1
    except Exception as err:  # noqa: BLE001 -- a broken page or stack, or a bug here: still one JSON line
        summary(
            run,
            False,
            step=getattr(run, "current", "start"),
            expected="no exception",
            seen=f"{type(err).__name__}: {str(err)[:500]}",
        )
        return 1
    summary(run, True, order_id=run.order_id, users=[run.uid_a, run.uid_b])
    return 0


if __name__ == "__main__":
    sys.exit(main())
