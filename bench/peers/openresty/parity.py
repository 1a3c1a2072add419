#!/usr/bin/env python3
"""Parity check: the same 20 seckill requests to the gateway and to the peer.

    python3 parity.py --gateway http://127.0.0.1:8080 --peer http://127.0.0.1:18181 \\
        --config deploy/seckill.toml            # or each of the flags below

Each target gets its own fresh sales (warmed into Redis exactly as
workers/src/sales.rs warms them: lua/workers/warm_sale.lua, then an
`updated` notice), so nothing one target writes changes what the other
answers. Each case goes to the gateway, then at once to the peer, and
the answers are compared on: status, content type, the problem's type,
title, status and detail (and that it has no other field), Retry-After
(present and equal; +-1 s where it is a time left), WWW-Authenticate and
Allow, and for a 202 the body's shape ({"status": "queued", "request_id":
32 hex digits, the same as X-Request-Id}). Each case also states the
status it means to provoke, so a setup that provokes nothing cannot pass.
Prints a table; exits 1 on any difference.

Standard library only; tokens are signed with the `cryptography` package
when importable, else with `openssl dgst -sha256 -sign`.
"""
import argparse
import base64
import hashlib
import hmac
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
import tomllib
import urllib.parse

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
WARM_SALE = os.path.join(ROOT, "lua", "workers", "warm_sale.lua")


# ----------------------------------------------------------------- Redis --
class Redis:
    """Just enough RESP2 for the set-up: one connection, one command at a time."""

    def __init__(self, url):
        u = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), 5)
        self.buf = b""
        if u.password:
            self(*(["AUTH", u.username, u.password] if u.username else ["AUTH", u.password]))
        db = (u.path or "/").strip("/")
        if db and db != "0":
            self("SELECT", db)

    def _line(self):
        while b"\r\n" not in self.buf:
            self.buf += self.sock.recv(65536)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self.buf += self.sock.recv(65536)
            data, self.buf = self.buf[:n], self.buf[n + 2:]
            return data.decode()
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RuntimeError(f"bad reply {line!r}")

    def __call__(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(out))
        return self._reply()


# ---------------------------------------------------------------- tokens --
def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Signer:
    def __init__(self, pem_path):
        self.pem_path = pem_path
        try:
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import padding

            key = serialization.load_pem_private_key(open(pem_path, "rb").read(), None)
            self.sign = lambda data: key.sign(data, padding.PKCS1v15(), hashes.SHA256())
            self.how = "cryptography"
        except ImportError:
            self.sign = self._openssl
            self.how = "openssl"

    def _openssl(self, data):
        return subprocess.run(["openssl", "dgst", "-sha256", "-sign", self.pem_path],
                              input=data, capture_output=True, check=True).stdout


def token(signer, kid, iss, aud, sub, alg="RS256", exp_in=3600):
    now = int(time.time())
    header = b64url(json.dumps({"alg": alg, "typ": "JWT", "kid": kid}).encode())
    claims = {"sub": str(sub), "iss": iss, "aud": aud, "exp": now + exp_in,
              "nbf": now - 10, "iat": now - 10, "username": f"parity{sub}"}
    payload = b64url(json.dumps(claims).encode())
    signing_input = f"{header}.{payload}".encode()
    if alg == "HS256":
        # The classic confusion attack: HMAC keyed with something public.
        sig = hmac.new(b"the-public-key-as-a-secret", signing_input, hashlib.sha256).digest()
    else:
        sig = signer.sign(signing_input)
    return f"{header}.{payload}.{b64url(sig)}"


# ----------------------------------------------------------------- sales --
def sale_base(prefix, sale_id):
    return f"{prefix}:{{sale:{sale_id}}}"


def warm(r, prefix, sale_id, stock, starts_ms, ends_ms):
    """workers::sales::warm: the warm_sale script, then an `updated` notice."""
    base = sale_base(prefix, sale_id)
    script = open(WARM_SALE).read()
    r("EVAL", script, 2, f"{base}:info", f"{base}:stock",
      stock, stock, starts_ms, ends_ms, 1, 100)
    r("PUBLISH", f"{prefix}:events:sales", json.dumps({"sale_id": sale_id, "kind": "updated"},
                                                       separators=(",", ":")))


def drop(r, prefix, sale_id):
    cursor = "0"
    while True:
        cursor, keys = r("SCAN", cursor, "MATCH", sale_base(prefix, sale_id) + ":*", "COUNT", 1000)
        if keys:
            r("DEL", *keys)
        if cursor == "0":
            return


# ------------------------------------------------------------------ HTTP --
class Answer:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = {k.lower(): v for k, v in headers}
        self.body = body
        try:
            self.json = json.loads(body) if body else None
        except ValueError:
            self.json = None

    def h(self, name):
        return self.headers.get(name)

    def short(self):
        j = self.json if isinstance(self.json, dict) else {}
        what = j.get("detail") or j.get("status") or ""
        ra = self.h("retry-after")
        return f"{self.status} {what}"[:52] + (f" [RA {ra}]" if ra else "")


def send(base_url, method, path, auth=None):
    u = urllib.parse.urlsplit(base_url)
    c = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=10)
    headers = {"Content-Length": "0"} if method == "POST" else {}
    if auth is not None:
        headers["Authorization"] = auth
    c.request(method, path, headers=headers)
    r = c.getresponse()
    a = Answer(r.status, r.getheaders(), r.read().decode("utf-8", "replace"))
    c.close()
    return a


# --------------------------------------------------------------- compare --
HEX32 = re.compile(r"^[0-9a-f]{32}$")


def shape_problems(a):
    """What is wrong with one answer on its own (either target)."""
    bad = []
    rid = a.h("x-request-id")
    if not rid or not HEX32.match(rid):
        bad.append(f"x-request-id {rid!r}")
    if a.status == 202:
        j = a.json if isinstance(a.json, dict) else {}
        if a.h("content-type") != "application/json" or set(j) != {"status", "request_id"} \
                or j.get("status") != "queued" or not HEX32.match(str(j.get("request_id"))) \
                or j.get("request_id") != rid:
            bad.append(f"202 body {a.body!r}")
    elif not isinstance(a.json, dict) or set(a.json) != {"type", "title", "status", "detail"} \
            or a.json.get("status") != a.status:
        bad.append(f"problem body {a.body!r}")
    return bad


def differences(g, p, time_left):
    diffs = []
    if g.status != p.status:
        diffs.append(f"status {g.status} vs {p.status}")
    for name in ("content-type", "www-authenticate", "allow"):
        if g.h(name) != p.h(name):
            diffs.append(f"{name} {g.h(name)!r} vs {p.h(name)!r}")
    if g.status != 202 and isinstance(g.json, dict) and isinstance(p.json, dict):
        for f in ("type", "title", "status", "detail"):
            if g.json.get(f) != p.json.get(f):
                diffs.append(f"{f} {g.json.get(f)!r} vs {p.json.get(f)!r}")
    gra, pra = g.h("retry-after"), p.h("retry-after")
    if (gra is None) != (pra is None):
        diffs.append(f"retry-after {gra!r} vs {pra!r}")
    elif gra is not None:
        try:
            off = abs(int(gra) - int(pra))
        except ValueError:
            off = None
        if off is None or off > (1 if time_left else 0):
            diffs.append(f"retry-after {gra} vs {pra}")
    for who, a in (("gateway", g), ("peer", p)):
        diffs += [f"{who}: {x}" for x in shape_problems(a)]
    return diffs


# ------------------------------------------------------------------ main --
def settings():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gateway", required=True, help="the gateway's URL")
    ap.add_argument("--peer", required=True, help="the peer's URL")
    ap.add_argument("--config", help="the TOML config both were started with")
    ap.add_argument("--redis-url")
    ap.add_argument("--prefix", help="redis.key_prefix")
    ap.add_argument("--private-key", help="PEM that signs tokens (jwt.private_key_path)")
    ap.add_argument("--kid", help="its kid (jwt.signing_kid)")
    ap.add_argument("--iss")
    ap.add_argument("--aud")
    ap.add_argument("--sale-id", type=int,
                    help="first of the 8 sale ids used (default: random, far above real ones)")
    ap.add_argument("--keep", action="store_true", help="leave the sales in Redis afterwards")
    a = ap.parse_args()
    cfg = {}
    if a.config:
        with open(a.config, "rb") as f:
            cfg = tomllib.load(f)
    redis_cfg, jwt_cfg = cfg.get("redis", {}), cfg.get("jwt", {})

    def pick(flag, value, default):
        return flag if flag is not None else value if value is not None else default

    a.redis_url = pick(a.redis_url, redis_cfg.get("url"), "redis://127.0.0.1:6379/")
    a.prefix = pick(a.prefix, redis_cfg.get("key_prefix"), "seckill")
    a.private_key = pick(a.private_key, jwt_cfg.get("private_key_path"),
                         "var/keys/dev-1.private.pem")
    if not os.path.isabs(a.private_key) and not os.path.exists(a.private_key) and a.config:
        a.private_key = os.path.join(os.path.dirname(os.path.abspath(a.config)), a.private_key)
    a.kid = pick(a.kid, jwt_cfg.get("signing_kid"), "dev-1")
    a.iss = pick(a.iss, jwt_cfg.get("issuer"), "seckill-api")
    a.aud = pick(a.aud, jwt_cfg.get("audience"), "seckill")
    if a.sale_id is None:
        a.sale_id = random.randrange(10 ** 12, 9 * 10 ** 12)
    return a


def main():
    a = settings()
    signer = Signer(a.private_key)
    r = Redis(a.redis_url)
    now = int(time.time() * 1000)

    # Per target: active (stock 2), not started, ended, and an id never warmed.
    targets = {}
    for i, (name, url) in enumerate((("gateway", a.gateway), ("peer", a.peer))):
        ids = [a.sale_id + 4 * i + k for k in range(4)]
        active, upcoming, ended, unknown = ids
        warm(r, a.prefix, active, 2, now - 60_000, now + 600_000)
        warm(r, a.prefix, upcoming, 5, now + 90_000, now + 600_000)
        warm(r, a.prefix, ended, 5, now - 600_000, now - 60_000)
        targets[name] = dict(url=url, active=active, upcoming=upcoming, ended=ended,
                             unknown=unknown, paths={})
    users = {"buyer": 7001, "last": 7002, "late": 7003, "wrong_path": 7004}
    for t in targets.values():
        for role, uid in users.items():
            hidden = os.urandom(16).hex()
            t["paths"][role] = hidden
            r("SET", f"{sale_base(a.prefix, t['active'])}:path:{uid}", hidden, "EX", 120)
    tok = {role: token(signer, a.kid, a.iss, a.aud, uid) for role, uid in users.items()}
    # A real header and payload with another token's signature.
    forged = tok["buyer"].rsplit(".", 1)[0] + "." + tok["last"].rsplit(".", 1)[1]
    other = {
        "expired": token(signer, a.kid, a.iss, a.aud, 7001, exp_in=-3600),
        "hs256": token(signer, a.kid, a.iss, a.aud, 7001, alg="HS256"),
        "unknown_kid": token(signer, "no-such-kid", a.iss, a.aud, 7001),
    }
    bearer = lambda t: f"Bearer {t}"
    path = lambda t, role="buyer": t["paths"][role]

    # name, expected status, time-left Retry-After, (target -> (method, path, auth)), repeats
    S = "/api/v1/seckill"
    cases = [
        ("no token", 401, lambda t: ("POST", f"{S}/{path(t)}/{t['active']}", None)),
        ("malformed token", 401,
         lambda t: ("POST", f"{S}/{path(t)}/{t['active']}", "Bearer not-a-jwt")),
        ("expired token", 401,
         lambda t: ("POST", f"{S}/{path(t)}/{t['active']}", bearer(other["expired"]))),
        ("HS256 token", 401,
         lambda t: ("POST", f"{S}/{path(t)}/{t['active']}", bearer(other["hs256"]))),
        ("unknown kid", 401,
         lambda t: ("POST", f"{S}/{path(t)}/{t['active']}", bearer(other["unknown_kid"]))),
        ("bad signature", 401,
         lambda t: ("POST", f"{S}/{path(t)}/{t['active']}", bearer(forged))),
        ("wrong method (GET)", 405,
         lambda t: ("GET", f"{S}/{path(t)}/{t['active']}", bearer(tok["buyer"]))),
        ("no route", 404,
         lambda t: ("POST", f"/api/v2/seckill/{path(t)}/{t['active']}", bearer(tok["buyer"]))),
        ("bad sale id 0x7", 404, lambda t: ("POST", f"{S}/{path(t)}/0x7", bearer(tok["buyer"]))),
        ("malformed path", 403,
         lambda t: ("POST", f"{S}/NOT-A-PATH/{t['active']}", bearer(tok["buyer"]))),
        ("unknown sale", 404,
         lambda t: ("POST", f"{S}/{path(t)}/{t['unknown']}", bearer(tok["buyer"]))),
        ("not started", 409,
         lambda t: ("POST", f"{S}/{path(t)}/{t['upcoming']}", bearer(tok["buyer"]))),
        ("ended", 409, lambda t: ("POST", f"{S}/{path(t)}/{t['ended']}", bearer(tok["buyer"]))),
        # The rule stored its "ended" answer for this sale id (5 s): it is
        # replayed before the path is even looked at.
        ("ended, stored answer", 409,
         lambda t: ("POST", f"{S}/NOT-A-PATH/{t['ended']}", bearer(tok["buyer"]))),
        ("bad path", 403,
         lambda t: ("POST", f"{S}/{'0' * 32}/{t['active']}", bearer(tok["wrong_path"]))),
        ("admitted", 202,
         lambda t: ("POST", f"{S}/{path(t)}/{t['active']}", bearer(tok["buyer"]))),
        ("duplicate", 409,
         lambda t: ("POST", f"{S}/{path(t)}/{t['active']}", bearer(tok["buyer"]))),
        # Attempts 3, 4 and 5 of the window are duplicates; the 6th is limited.
        ("limited (burst of 4)", 429,
         lambda t: ("POST", f"{S}/{path(t)}/{t['active']}", bearer(tok["buyer"])), 4),
        ("admitted, last unit", 202,
         lambda t: ("POST", f"{S}/{path(t, 'last')}/{t['active']}", bearer(tok["last"]))),
        ("sold out", 410,
         lambda t: ("POST", f"{S}/{path(t, 'late')}/{t['active']}", bearer(tok["late"]))),
    ]

    rows, failed = [], False
    for n, case in enumerate(cases, 1):
        name, expected, build = case[:3]
        repeats = case[3] if len(case) > 3 else 1
        diffs = []
        for k in range(repeats):
            g = send(targets["gateway"]["url"], *build(targets["gateway"]))
            p = send(targets["peer"]["url"], *build(targets["peer"]))
            d = differences(g, p, time_left=(name == "not started"))
            diffs += [f"(attempt {k + 1}) {x}" for x in d] if repeats > 1 else d
        if g.status != expected:
            diffs.append(f"meant to provoke {expected}, the gateway said {g.status}")
        failed |= bool(diffs)
        rows.append((n, name, g.short(), p.short(), "equal" if not diffs else "DIFF"))
        for d in diffs:
            rows.append(("", "", "  " + d, "", ""))

    widths = [3, 28, 62, 62, 5]
    head = ("#", "case", "gateway", "peer", "")
    print("  ".join(str(h).ljust(w) for h, w in zip(head, widths)).rstrip())
    for row in rows:
        print("  ".join(str(c)[:w].ljust(w) for c, w in zip(row, widths)).rstrip())
    equal = sum(1 for row in rows if row[4] == "equal")
    print(f"\n{equal}/{len(cases)} equal (sales {a.sale_id}..{a.sale_id + 7}, "
          f"prefix {a.prefix}, tokens by {signer.how})")
    if not a.keep:
        # The worker answers the gateway's admitted buyers a moment later
        # (result keys of a sale it does not know): wait for those writes,
        # so nothing is left behind once the sales are dropped.
        gw = sale_base(a.prefix, targets["gateway"]["active"])
        for _ in range(30):
            if all(r("EXISTS", f"{gw}:result:{users[u]}") for u in ("buyer", "last")):
                break
            time.sleep(0.1)
        for t in targets.values():
            for sid in (t["active"], t["upcoming"], t["ended"], t["unknown"]):
                drop(r, a.prefix, sid)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
