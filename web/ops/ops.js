/*
 * Live sale dashboard (/ops).
 *
 * Data flow
 *
 *   token form ──▶ sessionStorage ──▶ every authed request (Bearer)
 *                                      a 401 anywhere ──▶ "wrong token", form again
 *   GET /api/v1/sales (public) ──▶ sale chooser; the choice lives in the URL
 *                                  hash (#sale=7), newest sale by default
 *   every 1 s: GET /ops/api/sales/{id}
 *        └─▶ sample ──diff with the previous sample──▶ rates per second
 *              │        (Δcounter / Δserver_time; a drop is a counter
 *              │         reset of a restarted gateway: no rate, not < 0)
 *              ├─▶ tiles (current values, big numbers)
 *              ├─▶ history, last ~2 min ──▶ uPlot charts
 *              └─▶ process table (role, live/down, health, rules version)
 *   buttons: POST reload / replay / audit ──▶ result areas (+ a poll at once)
 *
 * Counters (admissions, refusals, decisions, committed) are cumulative on
 * the server, so the page never trusts its own timer for rates: it divides
 * by the difference of the server's clock between two samples.
 *
 * Everything data-driven is written with textContent (no innerHTML): sale
 * titles and compile errors are text, never markup.
 */
(function () {
  "use strict";

  // ── constants ────────────────────────────────────────────────────────

  var TOKEN_KEY = "seckill.ops.adminToken";
  var POLL_MS = 1000;
  var WINDOW_S = 120; // chart history
  var STALE_MS = 3500; // no fresh sample for this long: say so
  var REQUEST_TIMEOUT_MS = 5000;
  var ACTION_TIMEOUT_MS = 60000; // the audit waits for the sale to go quiet
  var SALES_REFRESH_MS = 10000; // new sales appear in the chooser

  // The refusal reasons, in the order an operator reads them (not_open:
  // the sale has not started or has ended). A reason the server adds later
  // is folded into `other`: the charts' series are fixed when they are
  // made, and a count must not vanish just because it has no name here.
  var REASONS = [
    { key: "sold_out", label: "Sold out", color: "#c0392b" },
    { key: "limited", label: "Limited", color: "#d68910" },
    { key: "duplicate", label: "Duplicate", color: "#7d3c98" },
    { key: "bad_path", label: "Bad path", color: "#6e4b2a" },
    { key: "not_ready", label: "Not ready", color: "#5d6d7e" },
    { key: "could_not_enqueue", label: "Could not enqueue", color: "#c2185b" },
    { key: "not_open", label: "Not open", color: "#2874a6" },
    { key: "other", label: "Other", color: "#117a65" }
  ];
  var ROLE_ORDER = { gateway: 0, api: 1, worker: 2 };

  // ── state ────────────────────────────────────────────────────────────

  var state = {
    token: null,
    sales: [], // from /api/v1/sales
    saleId: null,
    prev: null, // previous sample (for differencing)
    history: emptyHistory(),
    lastOkAt: 0, // Date.now() of the last good sample
    lastError: "",
    pollTimer: null,
    pollGen: 0, // bumps on sale switch / sign out: late answers are dropped
    salesTimer: null,
    charts: null,
    stockTotal: null,
    rulesVersion: null
  };

  var $ = function (id) { return document.getElementById(id); };
  var byTestId = function (id) { return document.querySelector('[data-testid="' + id + '"]'); };

  // ── formatting ───────────────────────────────────────────────────────

  var intFmt = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });

  function fmtInt(n) {
    return n == null || !isFinite(n) ? "–" : intFmt.format(n);
  }

  // Rates: one decimal while small (a trickle of 0.4/s is not "0").
  function fmtRate(r) {
    if (r == null || !isFinite(r)) return "–";
    if (r === 0) return "0";
    return r < 10 ? r.toFixed(1) : intFmt.format(Math.round(r));
  }

  function fmtMs(ms) {
    if (ms == null || !isFinite(ms)) return "–";
    if (ms < 10) return ms.toFixed(2) + " ms";
    if (ms < 1000) return ms.toFixed(1) + " ms";
    return (ms / 1000).toFixed(2) + " s";
  }

  function fmtUtc(iso) {
    var d = new Date(iso);
    if (isNaN(d)) return String(iso || "");
    return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }

  function fmtAgo(ms) {
    if (ms == null) return "–";
    return ms < 1000 ? ms + " ms ago" : (ms / 1000).toFixed(1) + " s ago";
  }

  // Sets a tile's text and its raw value (tests and tools read data-value,
  // people read the formatted text).
  function setValue(el, raw, text) {
    el.textContent = text;
    el.setAttribute("data-value", raw == null ? "" : String(raw));
  }

  // ── HTTP ─────────────────────────────────────────────────────────────

  // One request. Resolves to {status, body, problem} and never rejects:
  // a network failure is status 0 so callers branch in one place.
  function request(method, url, opts) {
    opts = opts || {};
    var headers = { Accept: "application/json" };
    if (opts.auth) headers.Authorization = "Bearer " + state.token;
    var ctl = new AbortController();
    var timer = setTimeout(function () { ctl.abort(); }, opts.timeout || REQUEST_TIMEOUT_MS);
    return fetch(url, { method: method, headers: headers, cache: "no-store", signal: ctl.signal })
      .then(function (res) {
        return res.text().then(function (text) {
          var body = null;
          try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
          return { status: res.status, body: body, problem: problemText(res.status, body, text) };
        });
      })
      .catch(function (err) {
        var why = err && err.name === "AbortError" ? "timed out" : "gateway unreachable";
        return { status: 0, body: null, problem: why };
      })
      .finally(function () { clearTimeout(timer); });
  }

  // The human sentence of an error answer (problem+json detail, else status).
  function problemText(status, body, text) {
    if (status >= 200 && status < 300) return "";
    if (body && (body.detail || body.title)) return body.detail || body.title;
    return "HTTP " + status + (text ? ": " + text.slice(0, 200) : "");
  }

  // ── token ────────────────────────────────────────────────────────────

  function loadToken() {
    try { return sessionStorage.getItem(TOKEN_KEY); } catch (e) { return null; }
  }

  function saveToken(t) {
    try { sessionStorage.setItem(TOKEN_KEY, t); } catch (e) { /* private mode: memory only */ }
    state.token = t;
  }

  function forgetToken() {
    try { sessionStorage.removeItem(TOKEN_KEY); } catch (e) { /* nothing stored */ }
    state.token = null;
  }

  function showLogin(message) {
    stopPolling();
    $("dashboard").hidden = true;
    $("controls").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    var input = $("token-input");
    input.value = "";
    input.setAttribute("aria-invalid", message ? "true" : "false");
    input.focus();
  }

  // Any 401: the token is wrong (or was rotated). Ask again.
  function wrongToken() {
    forgetToken();
    showLogin("Wrong token: the gateway refused it (401). Enter the admin token again.");
  }

  function onLoginSubmit(ev) {
    ev.preventDefault();
    var t = $("token-input").value.trim();
    if (!t) {
      $("login-error").textContent = "Enter the admin token.";
      return;
    }
    saveToken(t);
    openDashboard();
  }

  function onSignOut() {
    forgetToken();
    showLogin("");
  }

  // ── sale chooser ─────────────────────────────────────────────────────

  function saleFromHash() {
    var m = /(?:^|[#&])sale=(\d+)/.exec(location.hash);
    return m ? Number(m[1]) : null;
  }

  function loadSales() {
    return request("GET", "/api/v1/sales").then(function (res) {
      if (res.status === 200 && Array.isArray(res.body)) {
        state.sales = res.body.slice().sort(function (a, b) { return b.id - a.id; });
        renderSaleOptions();
        return true;
      }
      showNotice("Could not list sales: " + res.problem);
      return false;
    });
  }

  function renderSaleOptions() {
    var sel = $("sale-select");
    var keep = state.saleId;
    sel.textContent = "";
    state.sales.forEach(function (s) {
      var o = document.createElement("option");
      o.value = String(s.id);
      o.textContent = "#" + s.id + " " + s.title + " (" + s.status + ")";
      sel.appendChild(o);
    });
    if (keep != null && !knownSale(keep)) {
      // A sale from the hash that the list does not (yet) show stays chosen.
      var o = document.createElement("option");
      o.value = String(keep);
      o.textContent = "#" + keep;
      sel.appendChild(o);
    }
    if (keep != null) sel.value = String(keep);
  }

  // The chooser's list is re-read only every few seconds; the chosen
  // sale's label follows each sample so it never says "active" when sold out.
  function renameOption(s) {
    var o = $("sale-select").querySelector('option[value="' + s.id + '"]');
    if (o && s.title) o.textContent = "#" + s.id + " " + s.title + " (" + s.status + ")";
  }

  function knownSale(id) {
    return state.sales.some(function (s) { return s.id === id; });
  }

  // The hash names the sale; without one, the newest (highest id).
  function chooseSale() {
    var id = saleFromHash();
    if (id == null && state.sales.length) {
      id = state.sales[0].id;
      history.replaceState(null, "", "#sale=" + id);
    }
    return id;
  }

  function onSaleSelect() {
    location.hash = "sale=" + $("sale-select").value; // hashchange switches
  }

  function onHashChange() {
    var id = saleFromHash();
    if (id != null && id !== state.saleId && state.token) switchSale(id);
  }

  function switchSale(id) {
    state.saleId = id;
    state.prev = null;
    state.history = emptyHistory();
    state.lastOkAt = 0;
    state.rulesVersion = null;
    state.stockTotal = null;
    stopPolling(); // also drops answers still in flight for the old sale
    $("sale-select").value = String(id);
    clearSale();
    if (!knownSale(id)) {
      // Maybe created after the list was read: ask once more before polling
      // (polling an unknown sale would only collect 404s).
      loadSales().then(function () {
        if (state.saleId !== id) return;
        if (knownSale(id)) startPolling();
        else {
          $("freshness").textContent = "";
          showNotice("There is no sale #" + id + ". Choose one above.");
        }
      });
      return;
    }
    startPolling();
  }

  // ── polling ──────────────────────────────────────────────────────────

  function startPolling() {
    stopPolling();
    var gen = state.pollGen;
    pollOnce(gen);
  }

  function stopPolling() {
    clearTimeout(state.pollTimer);
    state.pollTimer = null;
    state.pollGen++;
  }

  // Polls now (after an action) without waiting for the next tick.
  function pollSoon() {
    if (state.saleId == null || !state.token) return;
    startPolling();
  }

  // One poll, then the next one a second after this one started: requests
  // never overlap, and a slow answer does not make them pile up.
  function pollOnce(gen) {
    if (gen !== state.pollGen) return; // a timer of a loop already stopped
    var started = Date.now();
    var id = state.saleId;
    request("GET", "/ops/api/sales/" + encodeURIComponent(id), { auth: true }).then(function (res) {
      if (gen !== state.pollGen) return; // sale switched or signed out meanwhile
      if (res.status === 401) return wrongToken();
      if (res.status === 200 && res.body) {
        ingest(res.body);
      } else {
        state.lastError = res.status === 404 ? "no sale #" + id : res.problem;
      }
      renderFreshness();
      var wait = Math.max(0, POLL_MS - (Date.now() - started));
      state.pollTimer = setTimeout(function () { pollOnce(gen); }, wait);
    });
  }

  // ── diff: samples → rates ────────────────────────────────────────────

  function emptyHistory() {
    var h = { t: [], stock: [], admissions: [], refusals: {} };
    REASONS.forEach(function (r) { h.refusals[r.key] = []; });
    return h;
  }

  // Per-second rate of a cumulative counter between two samples. A drop is
  // a reset (a gateway restarted and its share of the sum started from 0):
  // the increase since is unknown, so there is no rate for that interval.
  function rate(before, after, dtS) {
    if (before == null || after == null || !(dtS > 0)) return null;
    var d = after - before;
    return d < 0 ? null : d / dtS;
  }

  // The refusal counters by our reason keys; unnamed reasons fold into other.
  function refusalCounts(sample) {
    var src = sample.refusals || {};
    var out = {};
    var known = {};
    REASONS.forEach(function (r) { known[r.key] = true; out[r.key] = 0; });
    Object.keys(src).forEach(function (k) {
      var v = Number(src[k]) || 0;
      if (known[k]) out[k] += v;
      else out.other += v;
    });
    return out;
  }

  // Rates of this sample against the previous one (nulls when there is no
  // previous one, e.g. right after opening or switching sale).
  function rates(prev, cur) {
    var out = { admissions: null, committed: null, refusals: {}, first: !prev, reset: false, dropped: false };
    var dtS = prev ? (cur.t - prev.t) / 1000 : 0;
    REASONS.forEach(function (r) { out.refusals[r.key] = null; });
    if (!prev) return out;
    out.committed = rate(prev.committed, cur.committed, dtS); // MySQL's count
    // The server sums the counters of the LIVE gateways only: when one goes
    // down or comes back, the sum jumps by its whole lifetime count. That
    // interval says nothing about the rate, so it gets none.
    if (prev.gateways !== cur.gateways) {
      out.reset = true;
      return out;
    }
    out.admissions = rate(prev.admissions, cur.admissions, dtS);
    out.dropped = prev.admissions != null && cur.admissions != null && cur.admissions < prev.admissions;
    REASONS.forEach(function (r) {
      out.refusals[r.key] = rate(prev.refusals[r.key], cur.refusals[r.key], dtS);
    });
    return out;
  }

  // Reduces an answer to what the diff needs.
  function reduce(body) {
    return {
      t: Date.parse(body.server_time),
      admissions: numOrNull(body.admissions),
      committed: numOrNull(body.orders && body.orders.committed),
      refusals: refusalCounts(body),
      gateways: liveGateways(body.processes || [])
    };
  }

  function liveGateways(processes) {
    return processes
      .filter(function (p) { return p.role === "gateway" && p.live; })
      .map(function (p) { return String(p.id); })
      .sort()
      .join(" ");
  }

  function numOrNull(v) {
    return typeof v === "number" && isFinite(v) ? v : null;
  }

  function ingest(body) {
    var cur = reduce(body);
    if (isNaN(cur.t)) {
      state.lastError = "answer without server_time";
      return;
    }
    var prev = state.prev;
    // The same server instant twice (a retried answer) says nothing new.
    if (prev && cur.t <= prev.t) return;
    var r = rates(prev, cur);
    state.prev = cur;
    state.lastOkAt = Date.now();
    state.lastError = "";
    hideNotice();
    pushHistory(cur.t, body, r);
    renderSale(body);
    renderTiles(body, r);
    renderRefusals(body, r);
    renderProcesses(body.processes || []);
    renderCharts();
  }

  function pushHistory(t, body, r) {
    var h = state.history;
    h.t.push(t / 1000); // uPlot's x is in seconds
    h.stock.push(numOrNull(body.stock_left));
    h.admissions.push(r.admissions);
    REASONS.forEach(function (x) { h.refusals[x.key].push(r.refusals[x.key]); });
    // Keep a little more than the window so the left edge is drawn too.
    var cut = 0;
    var oldest = t / 1000 - WINDOW_S - 5;
    while (cut < h.t.length && h.t[cut] < oldest) cut++;
    if (cut) {
      h.t.splice(0, cut);
      h.stock.splice(0, cut);
      h.admissions.splice(0, cut);
      REASONS.forEach(function (x) { h.refusals[x.key].splice(0, cut); });
    }
  }

  // ── tiles ────────────────────────────────────────────────────────────

  function clearSale() {
    ["stock-left", "admissions-total", "admissions-rate", "committed", "queue-depth",
     "latency-publish-p99", "latency-e2e-p99", "rules-version"].forEach(function (id) {
      setValue(byTestId(id), null, "–");
    });
    ["stock-sub", "admissions-sub", "orders-sub", "queue-sub", "latency-publish-sub",
     "latency-e2e-sub", "rules-sub", "sale-window", "dlq-now"].forEach(function (id) {
      $(id).textContent = "";
    });
    var s = knownSale(state.saleId) ? state.sales.filter(function (x) { return x.id === state.saleId; })[0] : null;
    $("sale-heading").textContent = s ? "#" + s.id + " " + s.title : "Sale #" + state.saleId;
    $("sale-status").textContent = "";
    $("process-rows").textContent = "";
    renderRefusals(null, null);
    $("freshness").textContent = "Loading…";
    $("freshness").classList.remove("stale");
    hideNotice();
    if (state.charts) renderCharts();
  }

  function renderSale(body) {
    var s = body.sale || {};
    state.stockTotal = numOrNull(s.stock_total); // the stock chart's y range
    $("sale-heading").textContent = "#" + s.id + " " + (s.title || "");
    var badge = $("sale-status");
    badge.textContent = (s.status || "").replace("_", " ");
    badge.className = "badge status-" + (s.status || "unknown");
    renameOption(s);
    $("sale-window").textContent = "Window " + fmtUtc(s.starts_at) + " → " + fmtUtc(s.ends_at);
  }

  function renderTiles(body, r) {
    var total = body.sale && body.sale.stock_total;
    var left = numOrNull(body.stock_left);
    setValue(byTestId("stock-left"), left, fmtInt(left));
    $("stock-sub").textContent = total != null
      ? "of " + fmtInt(total) + (left != null && total > 0 ? " · " + Math.round(100 * (total - left) / total) + " % taken" : "")
      : "";

    setValue(byTestId("admissions-total"), numOrNull(body.admissions), fmtInt(body.admissions));
    setValue(byTestId("admissions-rate"), r.admissions, fmtRate(r.admissions));
    $("admissions-sub").textContent = admissionsNote(r);

    var o = body.orders || {};
    setValue(byTestId("committed"), numOrNull(o.committed), fmtInt(o.committed));
    $("orders-sub").textContent = fmtInt(o.unpaid) + " unpaid · " + fmtInt(o.paid) + " paid · " +
      fmtInt(o.closed) + " closed" + (body.failed_results ? " · " + fmtInt(body.failed_results) + " failed" : "");

    renderQueue(body.queue);
    renderLatency("publish", body.latency_ms && body.latency_ms.publish_confirm);
    renderLatency("e2e", body.latency_ms && body.latency_ms.end_to_end);
    renderRulesVersion(body.processes || []);
  }

  function admissionsNote(r) {
    if (r.first) return "rates from the next sample on";
    if (r.reset) return "a gateway went down or came back: no rate this second";
    if (r.dropped) return "counter reset (a gateway restarted): no rate this second";
    return "committing " + fmtRate(r.committed) + " orders/s";
  }

  // queue is null when the broker cannot be reached: say that, not "0".
  function renderQueue(q) {
    var el = byTestId("queue-depth");
    if (!q) {
      setValue(el, null, "–");
      $("queue-sub").textContent = "broker unreachable";
      $("queue-sub").classList.add("bad");
      $("dlq-now").textContent = "";
      return;
    }
    setValue(el, numOrNull(q.orders), fmtInt(q.orders));
    $("queue-sub").classList.toggle("bad", !!q.dead_letter || q.consumers === 0);
    $("queue-sub").textContent = fmtInt(q.dead_letter) + " dead-lettered · " + fmtInt(q.consumers) + " consumers";
    $("dlq-now").textContent = "Now: " + fmtInt(q.dead_letter) + " dead-lettered.";
  }

  // A histogram without samples has no percentile: "–", not 0 ms.
  function renderLatency(which, l) {
    var el = byTestId("latency-" + which + "-p99");
    var sub = $("latency-" + which + "-sub");
    if (!l || !l.count) {
      setValue(el, null, "–");
      sub.textContent = "no samples yet";
      return;
    }
    setValue(el, numOrNull(l.p99), fmtMs(l.p99));
    // The server's histograms are per process, cumulative since its start,
    // over every sale: say so, it is not this sale's last minute.
    sub.textContent = "p50 " + fmtMs(l.p50) + " · p90 " + fmtMs(l.p90) + " · n " + fmtInt(l.count) +
      " · all sales since start";
  }

  // The version the live gateways run; more than one means a reload or a
  // bundle push did not reach every gateway, which an operator must see.
  function renderRulesVersion(processes) {
    var versions = [];
    processes.forEach(function (p) {
      if (p.role !== "gateway" || !p.live || !p.rules || p.rules.version == null) return;
      var v = String(p.rules.version);
      if (versions.indexOf(v) < 0) versions.push(v);
    });
    var el = byTestId("rules-version");
    var sub = $("rules-sub");
    state.rulesVersion = versions.length === 1 ? versions[0] : null;
    if (!versions.length) {
      setValue(el, null, "–");
      sub.textContent = "no live gateway reports rules";
    } else if (versions.length === 1) {
      setValue(el, versions[0], versions[0]);
      var gws = processes.filter(function (p) { return p.role === "gateway" && p.live; });
      var loaded = gws.length && gws[0].rules && gws[0].rules.loaded_at;
      sub.textContent = "on " + gws.length + " live gateway" + (gws.length === 1 ? "" : "s") +
        (loaded ? " · loaded " + fmtUtc(loaded) : "");
      sub.classList.remove("bad");
    } else {
      setValue(el, versions.join(","), versions.join(" / "));
      sub.textContent = "gateways disagree";
      sub.classList.add("bad");
    }
  }

  // The refusal tiles are built once per render from REASONS (the markup
  // would only repeat itself seven times).
  function renderRefusals(body, r) {
    var dl = $("refusal-tiles");
    if (!dl.children.length) {
      REASONS.forEach(function (x) {
        var div = document.createElement("div");
        div.className = "tile";
        div.style.setProperty("--accent", x.color);
        var dt = document.createElement("dt");
        dt.textContent = x.label;
        var dd = document.createElement("dd");
        dd.className = "value";
        dd.setAttribute("data-testid", "refusal-" + x.key);
        var sub = document.createElement("dd");
        sub.className = "sub";
        sub.id = "refusal-sub-" + x.key;
        div.appendChild(dt);
        div.appendChild(dd);
        div.appendChild(sub);
        dl.appendChild(div);
      });
    }
    var counts = body ? refusalCounts(body) : null;
    REASONS.forEach(function (x) {
      var v = r ? r.refusals[x.key] : null;
      setValue(byTestId("refusal-" + x.key), v, fmtRate(v));
      $("refusal-sub-" + x.key).textContent = counts ? fmtInt(counts[x.key]) + " total" : "";
    });
  }

  // ── processes ────────────────────────────────────────────────────────

  function renderProcesses(processes) {
    var rows = processes.slice().sort(function (a, b) {
      var ra = ROLE_ORDER[a.role] != null ? ROLE_ORDER[a.role] : 9;
      var rb = ROLE_ORDER[b.role] != null ? ROLE_ORDER[b.role] : 9;
      return ra - rb || String(a.id).localeCompare(String(b.id));
    });
    var tbody = $("process-rows");
    tbody.textContent = "";
    if (!rows.length) {
      var tr = document.createElement("tr");
      var td = cell(tr, "Role", "No process has reported yet.");
      td.colSpan = 7;
      tbody.appendChild(tr);
      return;
    }
    rows.forEach(function (p) { tbody.appendChild(processRow(p)); });
  }

  function processRow(p) {
    var tr = document.createElement("tr");
    tr.setAttribute("data-testid", "process-row");
    tr.setAttribute("data-role", p.role);
    tr.setAttribute("data-live", p.live ? "true" : "false");
    tr.className = p.live ? "" : "down";
    cell(tr, "Role", p.role);
    cell(tr, "Instance", p.id).className = "mono";
    var st = cell(tr, "State", "");
    st.appendChild(pill(p.live ? (p.healthy === false ? "live, unhealthy" : "live") : "down",
      p.live && p.healthy !== false ? "good" : "bad"));
    cell(tr, "Last seen", fmtAgo(p.seen_ms_ago));
    var h = cell(tr, "Health checks", "");
    var checks = Object.keys(p.health || {});
    if (!checks.length) h.textContent = "–";
    checks.forEach(function (k) {
      h.appendChild(pill(k + (p.health[k] ? " ok" : " down"), p.health[k] ? "good" : "bad"));
    });
    var rv = cell(tr, "Rules", p.rules && p.rules.version != null ? String(p.rules.version) : "–");
    rv.className = "mono";
    if (p.rules && p.rules.loaded_at) rv.title = "loaded " + fmtUtc(p.rules.loaded_at);
    cell(tr, "Version", p.version || "–").className = "mono";
    return tr;
  }

  // data-label feeds the stacked layout on narrow screens (style.css).
  function cell(tr, label, text) {
    var td = document.createElement("td");
    td.setAttribute("data-label", label);
    td.textContent = text;
    tr.appendChild(td);
    return td;
  }

  function pill(text, kind) {
    var s = document.createElement("span");
    s.className = "pill " + kind;
    s.textContent = text;
    return s;
  }

  // ── charts ───────────────────────────────────────────────────────────

  function chartWidth(el) {
    return Math.max(240, Math.floor(el.getBoundingClientRect().width));
  }

  function chartHeight() {
    return window.matchMedia("(max-width: 600px)").matches ? 150 : 190;
  }

  // The x axis always shows the last WINDOW_S seconds of server time, so
  // the charts scroll steadily even while points are few.
  function xRange(u, min, max) {
    var h = state.history.t;
    var end = h.length ? h[h.length - 1] : Date.now() / 1000;
    return [end - WINDOW_S, end];
  }

  function zeroBased(u, min, max) {
    return [0, max > 0 ? max * 1.1 : 1];
  }

  function stockRange() {
    var h = state.history.stock;
    var top = 0;
    h.forEach(function (v) { if (v > top) top = v; });
    var total = state.stockTotal || top;
    return [0, Math.max(1, total)];
  }

  function baseOpts(el, series, yRange) {
    return {
      width: chartWidth(el),
      height: chartHeight(),
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true, range: xRange }, y: { range: yRange } },
      axes: [
        { stroke: "#4a5560", grid: { stroke: "#e4e8ec" }, ticks: { stroke: "#cfd6dc" } },
        { stroke: "#4a5560", grid: { stroke: "#e4e8ec" }, ticks: { stroke: "#cfd6dc" }, size: 56 }
      ],
      series: [{ label: "time (local)" }].concat(series)
    };
  }

  // uPlot is created lazily, once the dashboard is visible (a hidden
  // container has no width to draw into).
  function ensureCharts() {
    if (state.charts || typeof uPlot === "undefined") return state.charts;
    var stockEl = $("chart-stock");
    var admEl = $("chart-admissions");
    var refEl = $("chart-refusals");
    var fmtY = function (u, v) { return v == null ? "–" : fmtRate(v); };
    var charts = {
      stock: new uPlot(baseOpts(stockEl, [
        { label: "stock left", stroke: "#1f6feb", width: 2, fill: "rgba(31,111,235,0.12)", value: function (u, v) { return fmtInt(v); } }
      ], stockRange), [[], []], stockEl),
      admissions: new uPlot(baseOpts(admEl, [
        { label: "admissions/s", stroke: "#1e8449", width: 2, fill: "rgba(30,132,73,0.12)", value: fmtY }
      ], zeroBased), [[], []], admEl),
      refusals: new uPlot(baseOpts(refEl, REASONS.map(function (x) {
        return { label: x.label, stroke: x.color, width: 1.5, value: fmtY };
      }), zeroBased), [[]].concat(REASONS.map(function () { return []; })), refEl)
    };
    state.charts = charts;
    watchChartSizes();
    return charts;
  }

  function watchChartSizes() {
    var resize = function () {
      if (!state.charts) return;
      [["stock", "chart-stock"], ["admissions", "chart-admissions"], ["refusals", "chart-refusals"]].forEach(function (p) {
        var el = $(p[1]);
        var w = chartWidth(el);
        var u = state.charts[p[0]];
        if (u.width !== w || u.height !== chartHeight()) u.setSize({ width: w, height: chartHeight() });
      });
    };
    if (typeof ResizeObserver !== "undefined") {
      var ro = new ResizeObserver(function () { requestAnimationFrame(resize); });
      ro.observe($("chart-stock"));
    } else {
      window.addEventListener("resize", resize);
    }
  }

  function renderCharts() {
    var c = ensureCharts();
    if (!c) return;
    var h = state.history;
    c.stock.setData([h.t.slice(), h.stock.slice()]);
    c.admissions.setData([h.t.slice(), h.admissions.slice()]);
    c.refusals.setData([h.t.slice()].concat(REASONS.map(function (x) { return h.refusals[x.key].slice(); })));
  }

  // ── freshness & notices ──────────────────────────────────────────────

  function renderFreshness() {
    var el = $("freshness");
    var age = state.lastOkAt ? Date.now() - state.lastOkAt : null;
    var stale = age == null || age > STALE_MS;
    if (!stale) {
      el.textContent = "Live · updated every second";
    } else if (age == null) {
      el.textContent = state.lastError ? "No data: " + state.lastError : "Loading…";
    } else {
      el.textContent = "Stale: no fresh data for " + Math.round(age / 1000) + " s" +
        (state.lastError ? " (" + state.lastError + ")" : "");
    }
    el.classList.toggle("stale", stale && (age != null || !!state.lastError));
  }

  function showNotice(text) {
    var n = $("notice");
    n.textContent = text;
    n.hidden = false;
  }

  function hideNotice() {
    $("notice").hidden = true;
  }

  // ── actions ──────────────────────────────────────────────────────────

  // Busy buttons keep their focus (aria-disabled, not disabled: a disabled
  // button drops keyboard focus to <body>), and ignore clicks meanwhile.
  function runAction(button, busyText, work) {
    if (button.getAttribute("aria-disabled") === "true") return;
    var label = button.textContent;
    button.setAttribute("aria-disabled", "true");
    button.setAttribute("aria-busy", "true");
    button.textContent = busyText;
    work().then(function () {
      button.removeAttribute("aria-disabled");
      button.removeAttribute("aria-busy");
      button.textContent = label;
    });
  }

  function setResult(el, stateName, text) {
    el.setAttribute("data-state", stateName);
    el.className = "result " + stateName;
    el.textContent = text;
  }

  function onReload() {
    var result = $("reload-result");
    var pre = $("reload-errors");
    runAction($("reload-button"), "Reloading…", function () {
      setResult(result, "busy", "Reloading rules on every gateway…");
      pre.hidden = true;
      pre.textContent = "";
      return request("POST", "/ops/api/rules/reload", { auth: true, timeout: ACTION_TIMEOUT_MS }).then(function (res) {
        if (res.status === 401) return wrongToken();
        if ((res.status === 200 || res.status === 422) && res.body && Array.isArray(res.body.gateways)) {
          renderReload(res.body);
        } else {
          setResult(result, "error", "Reload failed: " + res.problem);
        }
        pollSoon();
      });
    });
  }

  // 200: every gateway took the rules. 422: at least one refused; its
  // compile errors are shown verbatim, with the version that keeps serving.
  function renderReload(body) {
    var result = $("reload-result");
    var pre = $("reload-errors");
    var refused = body.gateways.filter(function (g) { return g.status !== 200; });
    if (body.ok && !refused.length) {
      var versions = unique(body.gateways.map(function (g) { return g.body && g.body.version; }));
      var changed = body.gateways.some(function (g) { return g.body && g.body.changed; });
      setResult(result, "ok", "Reloaded on " + body.gateways.length + " gateway" +
        (body.gateways.length === 1 ? "" : "s") + ": version " + versions.join(" / ") +
        (changed ? "" : " (files unchanged, nothing swapped)") + ".");
      return;
    }
    var serving = unique(refused.map(function (g) { return g.body && g.body.serving && g.body.serving.version; }));
    var who = refused.length === body.gateways.length && refused.length > 1
      ? "all " + refused.length + " gateways"
      : refused.map(function (g) { return g.id; }).join(", ");
    var codes = unique(refused.map(function (g) { return g.status ? "HTTP " + g.status : "unreachable"; }));
    setResult(result, "refused", "Refused by " + who + " (" + codes.join(", ") + "). " +
      (serving.length ? "The previous version " + serving.join(" / ") + " keeps serving." : "The previous rules keep serving."));
    pre.textContent = reloadErrorsText(refused);
    pre.hidden = false;
  }

  // Identical errors of several gateways (the same files) are shown once.
  function reloadErrorsText(refused) {
    var texts = refused.map(function (g) {
      var b = g.body || {};
      if (Array.isArray(b.errors) && b.errors.length) return b.errors.join("\n");
      return b.detail || b.title || "no error text";
    });
    var distinct = unique(texts);
    if (distinct.length === 1) return distinct[0];
    return refused.map(function (g, i) { return "── " + g.id + " ──\n" + texts[i]; }).join("\n\n");
  }

  function unique(xs) {
    var out = [];
    xs.forEach(function (x) {
      if (x == null) return;
      var s = String(x);
      if (out.indexOf(s) < 0) out.push(s);
    });
    return out;
  }

  function onReplay() {
    var result = $("replay-result");
    runAction($("replay-button"), "Replaying…", function () {
      setResult(result, "busy", "Replaying the dead-letter queue…");
      return request("POST", "/ops/api/dlq/replay", { auth: true, timeout: ACTION_TIMEOUT_MS }).then(function (res) {
        if (res.status === 401) return wrongToken();
        if (res.status === 200 && res.body && typeof res.body.replayed === "number") {
          var n = res.body.replayed;
          setResult(result, "ok", n === 0 ? "The dead-letter queue was empty: nothing replayed."
            : "Replayed " + fmtInt(n) + " message" + (n === 1 ? "" : "s") + " to the order queue.");
          result.setAttribute("data-value", String(n));
        } else {
          setResult(result, "error", "Replay failed: " + res.problem);
        }
        pollSoon();
      });
    });
  }

  function onAudit() {
    var result = $("audit-result");
    var id = state.saleId;
    runAction($("audit-button"), "Auditing…", function () {
      result.removeAttribute("data-ok");
      result.setAttribute("aria-busy", "true");
      setResult(result, "busy", "Auditing sale #" + id + ": waiting for it to go quiet…");
      return request("POST", "/ops/api/sales/" + encodeURIComponent(id) + "/audit",
        { auth: true, timeout: ACTION_TIMEOUT_MS }).then(function (res) {
        result.removeAttribute("aria-busy");
        if (res.status === 401) return wrongToken();
        if (res.status === 200 && res.body && typeof res.body.ok === "boolean") renderAudit(res.body);
        else setResult(result, "error", "Audit failed: " + res.problem);
      });
    });
  }

  function renderAudit(a) {
    var result = $("audit-result");
    setResult(result, a.ok ? "ok" : "violations", "");
    result.setAttribute("data-ok", a.ok ? "true" : "false");
    var head = document.createElement("p");
    head.className = "audit-head";
    head.textContent = a.ok
      ? "OK: sale #" + a.sale_id + " holds every invariant checked" + (a.quiet ? "." : " (not quiet yet).")
      : "Violations in sale #" + a.sale_id + ": " + a.violations.length;
    result.appendChild(head);
    if (a.violations && a.violations.length) {
      var ul = document.createElement("ul");
      a.violations.forEach(function (v) {
        var li = document.createElement("li");
        li.textContent = v;
        ul.appendChild(li);
      });
      result.appendChild(ul);
    }
    var dl = document.createElement("dl");
    dl.className = "audit-figures";
    [["quiet", a.quiet ? "yes" : "no"], ["stock total", a.stock_total], ["MySQL stock left", a.mysql_stock_left],
     ["unpaid", a.orders_unpaid], ["paid", a.orders_paid], ["closed", a.orders_closed],
     ["duplicate pairs", a.duplicate_pairs], ["Redis stock", a.redis_stock == null ? "missing" : a.redis_stock],
     ["reservations", a.redis_reservations], ["buyers", a.redis_buyers],
     ["queue", a.queue_depth], ["dead letters", a.dlq_depth]].forEach(function (kv) {
      var d = document.createElement("div");
      var dt = document.createElement("dt");
      dt.textContent = kv[0];
      var dd = document.createElement("dd");
      dd.textContent = typeof kv[1] === "number" ? fmtInt(kv[1]) : String(kv[1]);
      d.appendChild(dt);
      d.appendChild(dd);
      dl.appendChild(d);
    });
    result.appendChild(dl);
  }

  // ── start-up ─────────────────────────────────────────────────────────

  function openDashboard() {
    $("login").hidden = true;
    $("login-error").textContent = "";
    $("dashboard").hidden = false;
    $("controls").hidden = false;
    $("freshness").textContent = "Loading…";
    loadSales().then(function () {
      if (!state.token) return;
      var id = chooseSale();
      if (id == null) {
        showNotice("No sale exists yet. Create one with `seckillctl sale create`; this page checks again every few seconds.");
        return;
      }
      state.saleId = null; // force the switch
      switchSale(id);
    });
    clearInterval(state.salesTimer);
    state.salesTimer = setInterval(refreshSales, SALES_REFRESH_MS);
  }

  // Keeps the chooser current; also picks up the first sale ever created.
  function refreshSales() {
    if (!state.token) return;
    loadSales().then(function () {
      if (state.saleId == null && state.token) {
        var id = chooseSale();
        if (id != null) switchSale(id);
      }
    });
  }

  function init() {
    $("login-form").addEventListener("submit", onLoginSubmit);
    $("sign-out").addEventListener("click", onSignOut);
    $("sale-select").addEventListener("change", onSaleSelect);
    $("reload-button").addEventListener("click", onReload);
    $("replay-button").addEventListener("click", onReplay);
    $("audit-button").addEventListener("click", onAudit);
    window.addEventListener("hashchange", onHashChange);
    state.token = loadToken();
    if (state.token) openDashboard();
    else showLogin("");
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
