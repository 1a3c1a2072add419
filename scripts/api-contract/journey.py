#!/usr/bin/env python3
"""The buyer's journey with a client generated from the OpenAPI document.

Proves the document is usable, not only valid: openapi-python-client
generates a client from what GET /api/v1/openapi.json serves, and every
HTTP call below goes through that generated code.

    journey.py --url http://127.0.0.1:8080 --redis-url redis://127.0.0.1:6379 \
        --captcha-key 'prefix:{sale:SALE}:captcha:{user_id}' \
        --sale-id 1 --cancel-sale-id 2 \
        --wallet-url http://127.0.0.1:8083 --admin-token TOKEN

The captcha answer is read from Redis (a person would read the PNG);
`{user_id}` and `SALE` in --captcha-key are filled in. The new buyer's
wallet is topped up through the wallet's admin route (ops would do it;
not part of the public API). Pays an order of --sale-id, checks the
wallet was charged once, cancels one of --cancel-sale-id. Prints one JSON line; exits
non-zero on the first answer that is not what the document promises.
"""

import argparse
import importlib
import json
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import redis

HERE = Path(__file__).resolve().parent
PACKAGE = "seckill_client"


class JourneyError(Exception):
    pass


def expect(response, status, what):
    if response.status_code != status:
        body = response.content.decode("utf-8", "replace")[:500]
        raise JourneyError(f"{what}: expected {status}, got {int(response.status_code)}: {body}")
    return response.parsed


def generate(url, workdir):
    """Downloads the document and generates the client package into workdir."""
    doc = workdir / "openapi.json"
    with urllib.request.urlopen(f"{url}/api/v1/openapi.json", timeout=10) as r:
        doc.write_bytes(r.read())
    out = workdir / PACKAGE
    subprocess.run(
        [
            "openapi-python-client", "generate",
            "--path", str(doc),
            "--meta", "none",
            "--output-path", str(out),
            "--config", str(HERE / "generator.yaml"),
            "--fail-on-warning",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    sys.path.insert(0, str(workdir))
    return importlib.import_module(PACKAGE)


class Buyer:
    """One fresh buyer, through the generated client only."""

    def __init__(self, pkg, url, store, captcha_key):
        self.pkg = pkg
        self.url = url
        self.store = store
        self.captcha_key = captcha_key
        self.models = importlib.import_module(f"{PACKAGE}.models")
        self.anonymous = pkg.Client(base_url=url, raise_on_unexpected_status=True)

    def sign_up(self):
        register, login = self.op("auth", "register"), self.op("auth", "login")
        creds = self.models.Credentials(
            username=f"journey_{secrets.token_hex(6)}", password=secrets.token_urlsafe(12)
        )
        registered = expect(
            register.sync_detailed(client=self.anonymous, body=creds), 201, "register"
        )
        logged_in = expect(login.sync_detailed(client=self.anonymous, body=creds), 200, "login")
        if logged_in.user_id != registered.user_id or logged_in.token_type != "Bearer":
            raise JourneyError(f"login answered {logged_in}")
        wrong = self.models.Credentials(username=creds.username, password="not the password")
        expect(login.sync_detailed(client=self.anonymous, body=wrong), 401, "wrong password")
        self.user_id = logged_in.user_id
        self.client = self.pkg.AuthenticatedClient(
            base_url=self.url, token=logged_in.access_token, raise_on_unexpected_status=True
        )

    def op(self, tag, name):
        return importlib.import_module(f"{PACKAGE}.api.{tag}.{name}")

    def buy(self, sale_id):
        """Sale → captcha → path → seckill → result; returns the order id."""
        listed = expect(self.op("sales", "list_sales").sync_detailed(client=self.anonymous), 200, "list sales")
        if sale_id not in [s.id for s in listed]:
            raise JourneyError(f"sale {sale_id} is not listed")
        sale = expect(self.op("sales", "get_sale").sync_detailed(sale_id, client=self.anonymous), 200, "get sale")
        if sale.status.value != "active" or sale.stock_left < 1:
            raise JourneyError(f"sale {sale_id} is {sale.status.value} with {sale.stock_left} left")
        png = expect(self.op("sales", "get_captcha").sync_detailed(sale_id, client=self.client), 200, "captcha")
        if not png.payload.read().startswith(b"\x89PNG\r\n\x1a\n"):
            raise JourneyError("the captcha is not a PNG")
        key = self.captcha_key.replace("SALE", str(sale_id)).replace("{user_id}", str(self.user_id))
        answer = self.store.get(key)
        if answer is None:
            raise JourneyError(f"no captcha answer at {key}")
        body = self.models.PathRequest(captcha_answer=int(answer))
        issued = expect(
            self.op("sales", "issue_path").sync_detailed(sale_id, client=self.client, body=body), 200, "path"
        )
        queued = expect(
            self.op("seckill", "seckill").sync_detailed(issued.path, sale_id, client=self.client), 202, "seckill"
        )
        if queued.status.value != "queued" or not queued.request_id:
            raise JourneyError(f"seckill answered {queued}")
        again = self.op("seckill", "seckill").sync_detailed(issued.path, sale_id, client=self.client)
        expect(again, 409, "a second attempt")
        return self.result(sale_id)

    def result(self, sale_id, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            polled = expect(
                self.op("sales", "get_result").sync_detailed(sale_id, client=self.client), 200, "result"
            )
            if polled.status.value == "success":
                return str(polled.order_id)
            if polled.status.value in ("failed", "none"):
                raise JourneyError(f"the attempt at sale {sale_id} ended {polled.status.value}")
            time.sleep(0.2)
        raise JourneyError(f"sale {sale_id}: no result within {timeout} s")

    def top_up(self, wallet_url, admin_token, cents):
        """Ops' top-up, through the wallet's admin route (not the public API)."""
        body = json.dumps({"user_id": self.user_id, "amount_cents": cents}).encode()
        request = urllib.request.Request(
            f"{wallet_url}/admin/wallet/credit",
            data=body,
            method="POST",
            headers={"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            if r.status != 200:
                raise JourneyError(f"top-up answered {r.status}")
        self.topped_up = cents

    def wallet(self):
        return expect(self.op("orders", "get_wallet").sync_detailed(client=self.client), 200, "wallet")

    def pay(self, order_id):
        orders = expect(self.op("orders", "list_orders").sync_detailed(client=self.client), 200, "orders")
        if order_id not in [str(o.id) for o in orders]:
            raise JourneyError(f"order {order_id} is not listed")
        order = expect(self.op("orders", "get_order").sync_detailed(order_id, client=self.client), 200, "order")
        if order.status.value != "unpaid":
            raise JourneyError(f"a new order is {order.status.value}")
        key = expect(
            self.op("orders", "get_idempotency_key").sync_detailed(client=self.client), 200, "key"
        ).key
        pay = self.op("orders", "pay_order")
        paid = expect(pay.sync_detailed(order_id, client=self.client, idempotency_key=key), 200, "pay")
        replay = pay.sync_detailed(order_id, client=self.client, idempotency_key=key)
        expect(replay, 200, "pay again with the same key")
        if paid.status.value != "paid" or replay.parsed.to_dict() != paid.to_dict():
            raise JourneyError(f"pay answered {paid}, its replay {replay.parsed}")
        if replay.headers.get("idempotent-replayed") != "true":
            raise JourneyError("the replay is not marked Idempotent-Replayed")
        cancel = self.op("orders", "cancel_order").sync_detailed(order_id, client=self.client)
        expect(cancel, 409, "cancel a paid order")
        wallet = self.wallet()
        if wallet.balance_cents != self.topped_up - paid.amount_cents or wallet.frozen_cents != 0:
            raise JourneyError(f"after paying {paid.amount_cents}: {wallet}")
        debits = [e for e in wallet.ledger if e.kind.value == "debit"]
        if len(debits) != 1 or str(debits[0].order_id) != order_id:
            raise JourneyError(f"the ledger does not hold one debit of the order: {wallet.ledger}")

    def cancel(self, order_id):
        closed = expect(
            self.op("orders", "cancel_order").sync_detailed(order_id, client=self.client), 200, "cancel"
        )
        if closed.status.value != "closed" or closed.close_reason.value != "cancelled":
            raise JourneyError(f"cancel answered {closed}")

    def refusals(self):
        """Problems the document promises: 401 without a token, 404 for an unknown order."""
        anonymous_orders = self.pkg.AuthenticatedClient(base_url=self.url, token="not.a.jwt")
        r = self.op("orders", "list_orders").sync_detailed(client=anonymous_orders)
        problem = expect(r, 401, "a forged token")
        if problem.status != 401 or "bearer" not in r.headers.get("www-authenticate", "").lower():
            raise JourneyError(f"401 answered {problem} {dict(r.headers)}")
        unknown = "00000000-0000-7000-8000-000000000000"
        r = self.op("orders", "get_order").sync_detailed(unknown, client=self.client)
        if expect(r, 404, "an unknown order").status != 404:
            raise JourneyError("the 404 problem does not say 404")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--captcha-key", required=True)
    p.add_argument("--sale-id", type=int, required=True)
    p.add_argument("--cancel-sale-id", type=int, required=True)
    p.add_argument("--wallet-url", required=True)
    p.add_argument("--admin-token", required=True)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pkg = generate(args.url, Path(tmp))
        store = redis.Redis.from_url(args.redis_url, decode_responses=True)
        buyer = Buyer(pkg, args.url, store, args.captcha_key)
        try:
            buyer.sign_up()
            buyer.top_up(args.wallet_url, args.admin_token, 100_000)
            paid = buyer.buy(args.sale_id)
            buyer.pay(paid)
            cancelled = buyer.buy(args.cancel_sale_id)
            buyer.cancel(cancelled)
            buyer.refusals()
        except JourneyError as e:
            print(f"journey failed: {e}", file=sys.stderr)
            return 1
    print(json.dumps({"user_id": buyer.user_id, "paid": paid, "cancelled": cancelled}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
