/*
 * Buyer storefront of the flash-sale platform: one page, no framework, no build.
 *
 * How the page is organised (top to bottom in this file):
 *   1. helpers  h() builds DOM nodes from text (never innerHTML, so a sale
 *               title cannot inject markup); money and time formatting.
 *   2. api      api() wraps fetch: adds the Bearer token, and turns a
 *               problem+json answer into an ApiError whose `detail` is what
 *               the buyer reads and whose `retryAfter` the sale page honours.
 *   3. session  the login answer lives in sessionStorage (gone with the tab);
 *               an expired token is dropped before use, so no request is sent
 *               that is known to fail with 401.
 *   4. router   the hash (#/, #/sales/7, #/orders, #/login, #/register) picks
 *               a view; each view gets a Scope whose timers and polls stop
 *               when the buyer navigates away.
 *   5. views    sales list, sale page, my orders, log in / register.
 *
 * Data flow: a view fetches what it shows when it opens and renders from that
 * answer; there is no global store. The sale page is a small state machine:
 *   upcoming (countdown on the SERVER's clock) → open (captcha shown)
 *   → busy (answer → hidden path → seckill POST) → polling (result)
 *   → done; a refusal sends it back to open (with a new captcha), into a
 *   Retry-After wait, or to done, always saying why in the API's own words.
 */

const API = '/api/v1';
const SESSION_KEY = 'storefront.session';
const RESULT_POLL_MS = 500;
const RESULT_POLL_LIMIT_MS = 30_000;
const LIST_REFRESH_MS = 10_000;
const SOLD_OUT_RECHECK_MS = 10_000;
const TICK_MS = 200;
// No request may leave a button spinning for ever.
const REQUEST_TIMEOUT_MS = 15_000;
// A hidden path this close to its expiry is not worth sending: it would come
// back 403 and cost the buyer a captcha anyway.
const PATH_SAFETY_MS = 3_000;
// The API speaks integer cents with no currency; the shop shows dollars.
const money = new Intl.NumberFormat('en-US', { style: 'currency', currency: 'USD' });
const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });

/* ───────────────────────── 1. helpers ───────────────────────── */

/** Creates an element: props become attributes (on* become listeners). */
function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value == null || value === false) continue;
    if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
    else if (name === 'class') el.className = value;
    else el.setAttribute(name, value === true ? '' : String(value));
  }
  el.append(...children.flat().filter((c) => c != null && c !== false));
  return el;
}

function formatCents(cents) {
  // Division is for display only; amounts are never computed here.
  return money.format(cents / 100);
}

/** RFC 3339 → epoch ms; the server sends nanoseconds, Date.parse wants ≤ 3 digits. */
function parseTime(iso) {
  return Date.parse(String(iso).replace(/(\.\d{3})\d+/, '$1'));
}

function formatTime(iso) {
  return dateTime.format(new Date(parseTime(iso)));
}

/** "2d 03:04:05" / "00:00:09"; rounds up so zero shows only when it is zero. */
function formatDuration(ms) {
  const total = Math.max(0, Math.ceil(ms / 1000));
  const days = Math.floor(total / 86_400);
  const hms = [Math.floor((total % 86_400) / 3600), Math.floor((total % 3600) / 60), total % 60]
    .map((n) => String(n).padStart(2, '0'))
    .join(':');
  return days ? `${days}d ${hms}` : hms;
}

/** The API's details are lower-case fragments ("sold out"); show sentences. */
function sentence(text) {
  const t = String(text || '').trim();
  if (!t) return '';
  const capital = t[0].toUpperCase() + t.slice(1);
  return /[.!?]$/.test(capital) ? capital : `${capital}.`;
}

function discountPercent(sale) {
  if (!(sale.price_cents > 0) || sale.sale_price_cents >= sale.price_cents) return 0;
  return Math.round((1 - sale.sale_price_cents / sale.price_cents) * 100);
}

const STATUS_LABELS = {
  upcoming: 'Coming soon',
  active: 'On sale now',
  sold_out: 'Sold out',
  ended: 'Ended',
};

function statusPill(status, testid = 'sale-status') {
  return h('span', { class: `pill pill-${status}`, 'data-testid': testid }, STATUS_LABELS[status] || status);
}

/** A decorative product tile: the API has no pictures, so colour comes from the goods id. */
function productArt(sale, size = 'small') {
  const hue = (Number(sale.goods_id) * 47) % 360;
  const off = discountPercent(sale);
  return h('div', { class: `art art-${size}`, style: `--hue:${hue}`, 'aria-hidden': 'true' },
    h('span', { class: 'art-letter' }, (sale.title || '?').trim().charAt(0).toUpperCase()),
    off ? h('span', { class: 'art-badge' }, `−${off}%`) : null);
}

function priceLine(sale) {
  return h('p', { class: 'price' },
    h('span', { class: 'price-now', 'data-testid': 'sale-price' }, formatCents(sale.sale_price_cents)),
    sale.price_cents > sale.sale_price_cents
      ? h('s', { class: 'price-was' }, h('span', { class: 'visually-hidden' }, 'usual price '), formatCents(sale.price_cents))
      : null);
}

function stockMeter(sale) {
  const total = Math.max(1, sale.stock_total);
  const left = Math.max(0, Math.min(sale.stock_left, total));
  return h('div', { class: 'stock' },
    h('div', { class: 'stock-bar', 'aria-hidden': 'true' },
      h('span', { style: `width:${(left / total) * 100}%` })),
    h('span', { class: 'stock-text', 'data-testid': 'stock-left' }, `${sale.stock_left} of ${sale.stock_total} left`));
}

function whenText(sale) {
  switch (sale.status) {
    case 'upcoming': return `Starts ${formatTime(sale.starts_at)}`;
    case 'active': return `Ends ${formatTime(sale.ends_at)}`;
    case 'sold_out': return 'Every unit is reserved';
    default: return `Ended ${formatTime(sale.ends_at)}`;
  }
}

/* ───────────────────────── 2. api ───────────────────────── */

class ApiError extends Error {
  constructor(status, detail, retryAfter = null) {
    super(detail);
    this.status = status;
    this.detail = detail;
    this.retryAfter = retryAfter;
  }
}

/**
 * One API call. `auth` adds the token (and refuses locally without one);
 * `as: 'blob'` returns the body as a Blob (the captcha PNG).
 */
async function api(path, { method = 'GET', body, auth = false, headers = {}, as = 'json' } = {}) {
  const init = {
    method,
    headers: { Accept: 'application/json, application/problem+json', ...headers },
    signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
  };
  if (auth) {
    const session = currentSession();
    if (!session) {
      sessionEnded();
      throw new ApiError(401, 'Please log in to continue.');
    }
    init.headers.Authorization = `Bearer ${session.token}`;
  }
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(API + path, init);
  } catch (err) {
    throw new ApiError(0, err?.name === 'TimeoutError'
      ? 'The shop did not answer in time. Please try again.'
      : 'The shop could not be reached. Check your connection and try again.');
  }
  if (!res.ok) throw await problemOf(res, auth);
  if (as === 'blob') return res.blob();
  return res.status === 204 ? null : res.json();
}

/** Reads an error answer: its `detail` in plain words, and Retry-After seconds. */
async function problemOf(res, auth) {
  let detail = '';
  if ((res.headers.get('Content-Type') || '').includes('json')) {
    try {
      const problem = await res.json();
      // Some details name a sale status by its enum value ("the sale is
      // sold_out"); the buyer reads words.
      detail = String(problem.detail || problem.title || '').replace(/\bsold_out\b/g, 'sold out');
    } catch { /* a broken body still gets the generic text below */ }
  }
  const seconds = Number.parseInt(res.headers.get('Retry-After') ?? '', 10);
  if (res.status === 401 && auth) sessionEnded();
  return new ApiError(
    res.status,
    sentence(detail) || `Something went wrong (${res.status}). Please try again.`,
    Number.isFinite(seconds) && seconds >= 0 ? seconds : null,
  );
}

/* ───────────────────────── 3. session ───────────────────────── */

/** The logged-in buyer, or null. Drops a token 30 s before it expires. */
function currentSession() {
  let session = null;
  try {
    session = JSON.parse(sessionStorage.getItem(SESSION_KEY));
  } catch { /* unreadable: treated as logged out */ }
  if (!session || typeof session.token !== 'string') return null;
  if (Date.now() > session.expiresAt - 30_000) {
    sessionStorage.removeItem(SESSION_KEY);
    return null;
  }
  return session;
}

function saveSession(login, username) {
  sessionStorage.setItem(SESSION_KEY, JSON.stringify({
    token: login.access_token,
    userId: login.user_id,
    username,
    // expires_in is a duration, so the local clock is fine for this one.
    expiresAt: Date.now() + login.expires_in * 1000,
  }));
}

function logOut() {
  sessionStorage.removeItem(SESSION_KEY);
  renderAccount();
  navigate('/');
}

/** The token is gone or refused: send the buyer to log in, then back here. */
function sessionEnded() {
  sessionStorage.removeItem(SESSION_KEY);
  renderAccount();
  const { path } = parseHash();
  if (path !== '/login' && path !== '/register') {
    location.replace(`#/login?reason=expired&next=${encodeURIComponent(path)}`);
  }
}

async function logIn(username, password) {
  const login = await api('/auth/login', { method: 'POST', body: { username, password } });
  saveSession(login, username);
  renderAccount();
}

/* ───────────────────────── 4. router ───────────────────────── */

/** Timers and polls of one view; all stop when the view is left. */
class Scope {
  #cleanups = [];
  alive = true;

  later(fn, ms) {
    const id = setTimeout(() => this.alive && fn(), ms);
    this.#cleanups.push(() => clearTimeout(id));
  }

  every(fn, ms) {
    const id = setInterval(() => this.alive && fn(), ms);
    this.#cleanups.push(() => clearInterval(id));
  }

  /** Resolves after ms, or never once the view is left (so loops just stop). */
  sleep(ms) {
    return new Promise((resolve) => this.later(resolve, ms));
  }

  onDispose(fn) {
    this.#cleanups.push(fn);
  }

  dispose() {
    this.alive = false;
    for (const fn of this.#cleanups.splice(0)) fn();
  }
}

const ROUTES = [
  { pattern: /^\/$/, view: salesView },
  { pattern: /^\/sales\/(\d{1,15})$/, view: saleView },
  { pattern: /^\/orders$/, view: ordersView, needsLogin: true },
  { pattern: /^\/login$/, view: loginView },
  { pattern: /^\/register$/, view: registerView },
];

const main = document.getElementById('main');
let scope = null;
let firstRoute = true;

function parseHash() {
  const [rawPath, query = ''] = location.hash.replace(/^#/, '').split('?');
  let path = rawPath;
  try {
    path = decodeURIComponent(rawPath);
  } catch { /* a malformed escape is just an unknown page */ }
  return { path: path || '/', query: new URLSearchParams(query) };
}

function navigate(path) {
  location.hash = `#${path}`;
}

/** Only in-app paths are followed after login (no open redirect via ?next=). */
function safeNext(next) {
  return next && /^\/[A-Za-z0-9/_-]*$/.test(next) && !/^\/(login|register)/.test(next) ? next : '/';
}

function route() {
  const { path, query } = parseHash();
  scope?.dispose();
  scope = new Scope();
  const found = ROUTES.map((r) => ({ r, m: path.match(r.pattern) })).find((x) => x.m);
  if (found?.r.needsLogin && !currentSession()) {
    location.replace(`#/login?next=${encodeURIComponent(path)}`);
    return;
  }
  markCurrentNav(path);
  main.replaceChildren();
  const view = found ? found.r.view : notFoundView;
  const viewScope = scope;
  // Called synchronously: a view builds its heading before its first await.
  let rendering;
  try {
    rendering = view(main, found ? found.m.slice(1) : [], query, viewScope);
  } catch (err) {
    rendering = Promise.reject(err);
  }
  Promise.resolve(rendering).catch((err) => viewScope.alive && showViewError(err));
  // Move focus to the new page's heading (views create it synchronously), so
  // keyboard and screen-reader users start at the top of what changed.
  if (!firstRoute) main.querySelector('h1')?.focus();
  firstRoute = false;
}

function markCurrentNav(path) {
  for (const link of document.querySelectorAll('[data-nav]')) {
    if (link.dataset.nav === path) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
}

function renderAccount() {
  const slot = document.getElementById('account');
  const session = currentSession();
  if (session) {
    slot.replaceChildren(
      h('span', { class: 'who', title: session.username, 'data-testid': 'nav-user', 'data-user-id': session.userId }, session.username),
      h('button', { type: 'button', class: 'button-quiet', 'data-testid': 'logout-button', onclick: logOut }, 'Log out'),
    );
  } else {
    const { path } = parseHash();
    const next = safeNext(path);
    slot.replaceChildren(h('a', {
      href: next === '/' ? '#/login' : `#/login?next=${encodeURIComponent(next)}`,
      'data-testid': 'login-link',
    }, 'Log in'));
  }
}

function heading(text) {
  document.title = `${text} · Flash Sale`;
  return h('h1', { tabindex: '-1' }, text);
}

function showViewError(err) {
  const detail = err instanceof ApiError ? err.detail : 'Something went wrong on this page.';
  if (!(err instanceof ApiError)) console.warn(err); // a bug, not a refusal: keep it findable
  main.append(h('div', { class: 'message', 'data-state': 'error', role: 'alert', 'data-testid': 'page-error' },
    h('p', {}, detail),
    h('button', { type: 'button', onclick: route }, 'Try again')));
}

function notFoundView(root) {
  root.append(heading('Page not found'),
    h('p', {}, 'There is nothing at this address. ', h('a', { href: '#/' }, 'See all sales'), '.'));
}

/* ───────────────────────── 5a. sales list ───────────────────────── */

const STATUS_ORDER = { active: 0, upcoming: 1, sold_out: 2, ended: 3 };

function sortSales(sales) {
  return [...sales].sort((a, b) =>
    (STATUS_ORDER[a.status] ?? 9) - (STATUS_ORDER[b.status] ?? 9) || parseTime(a.starts_at) - parseTime(b.starts_at));
}

function saleCard(sale) {
  return h('li', {},
    h('a', { class: 'card', href: `#/sales/${sale.id}`, 'data-testid': 'sale-card', 'data-sale-id': sale.id, 'data-status': sale.status },
      productArt(sale),
      h('div', { class: 'card-body' },
        h('div', { class: 'card-top' }, statusPill(sale.status)),
        h('h2', { class: 'card-title' }, sale.title),
        priceLine(sale),
        stockMeter(sale),
        h('p', { class: 'muted small' }, whenText(sale)))));
}

async function salesView(root, _params, _query, viewScope) {
  const note = h('p', { class: 'muted', role: 'status' }, 'Loading sales…');
  const list = h('ul', { class: 'sale-grid', 'data-testid': 'sale-list' });
  root.append(heading('Flash sales'),
    h('p', { class: 'lead' }, 'Limited stock at flash prices. Each sale opens at its start time; one unit per buyer.'),
    note, list);
  let shown = '';
  // Re-render only when something changed, and keep keyboard focus on the
  // card it was on, so the periodic refresh never yanks the buyer around.
  async function refresh() {
    const sales = await api('/sales');
    const key = JSON.stringify(sales);
    if (key === shown || !viewScope.alive) return;
    shown = key;
    note.textContent = sales.length ? '' : 'No sales right now. Check back soon.';
    note.hidden = sales.length > 0;
    const focused = document.activeElement?.closest?.('[data-sale-id]')?.dataset.saleId;
    list.replaceChildren(...sortSales(sales).map(saleCard));
    if (focused) list.querySelector(`[data-sale-id="${focused}"]`)?.focus();
  }
  await refresh();
  // Statuses and stock move on their own (a sale opens, stock runs out).
  viewScope.every(() => refresh().catch(() => { /* keep what is shown; the next tick retries */ }), LIST_REFRESH_MS);
}

/* ───────────────────────── 5b. sale page ───────────────────────── */

/** Fetches a sale with the server's clock: returns {sale, serverNow()}. */
async function loadSale(id) {
  const sentAt = performance.now();
  const sale = await api(`/sales/${id}`);
  const receivedAt = performance.now();
  // offset = server_time − local time at arrival. Local time is the request's
  // midpoint (half the round trip each way) on performance.now(), which moving
  // the device clock does not change: the countdown trusts only the server.
  const offset = parseTime(sale.server_time) - (sentAt + receivedAt) / 2;
  return { sale, serverNow: () => performance.now() + offset };
}

async function saleView(root, [id], _query, viewScope) {
  const title = heading('Sale');
  root.append(h('a', { href: '#/', class: 'back' }, '← All sales'), title);
  let { sale, serverNow } = await loadSale(id);
  if (!viewScope.alive) return;
  title.textContent = sale.title;
  document.title = `${sale.title} · Flash Sale`;

  const session = currentSession();
  const state = { phase: 'upcoming', path: null, retryUntil: 0, captchaUrl: null, captchaSeq: 0, doneLabel: '', watching: false };
  const startsAt = () => parseTime(sale.starts_at);
  const endsAt = () => parseTime(sale.ends_at);

  // ── the page's elements ──
  const pill = h('span', {}, statusPill(sale.status));
  const stock = h('div', {}, stockMeter(sale));
  const countdownLabel = h('span', { class: 'countdown-label' });
  const countdown = h('span', { class: 'countdown-value', 'data-testid': 'countdown', role: 'timer' });
  const message = h('div', { class: 'message', role: 'status', 'data-testid': 'sale-message', hidden: true });
  const img = h('img', { class: 'captcha-img', 'data-testid': 'captcha-img', alt: 'Captcha: a sum to work out', height: '53' });
  const answer = h('input', {
    id: 'captcha-answer', name: 'captcha_answer', inputmode: 'numeric', autocomplete: 'off',
    'data-testid': 'captcha-answer', 'aria-describedby': 'captcha-help', disabled: true,
  });
  const newPicture = h('button', { type: 'button', class: 'button-quiet', 'data-testid': 'captcha-refresh', onclick: () => loadCaptcha(true) }, 'New picture');
  const captchaBox = h('div', { class: 'captcha', hidden: true },
    h('div', { class: 'captcha-row' }, img, newPicture),
    h('label', { for: 'captcha-answer' }, 'Answer'),
    answer,
    h('p', { id: 'captcha-help', class: 'muted small' }, 'Work out the sum in the picture and type the number.'));
  const captchaNote = h('p', { class: 'muted small', 'data-testid': 'captcha-note' }, 'The captcha appears here when the sale opens.');
  const buyButton = h('button', { type: 'submit', class: 'buy', 'data-testid': 'buy-button', disabled: true }, 'Opens at start');
  const buyForm = session
    ? h('form', { class: 'buy-form', 'data-testid': 'buy-form', novalidate: true, onsubmit: onBuy }, captchaNote, captchaBox, buyButton)
    : h('p', { class: 'buy-form' }, h('a', { class: 'button', href: `#/login?next=${encodeURIComponent(`/sales/${id}`)}`, 'data-testid': 'login-to-buy' }, 'Log in to buy'));
  const page = h('section', { class: 'sale-page', 'data-testid': 'sale-page', 'data-sale-id': sale.id },
    productArt(sale, 'large'),
    h('div', { class: 'sale-info' },
      pill,
      priceLine(sale),
      stock,
      h('p', { class: 'muted small' }, `${formatTime(sale.starts_at)} – ${formatTime(sale.ends_at)}`),
      h('div', { class: 'countdown' }, countdownLabel, countdown),
      buyForm,
      message));
  root.append(page);
  viewScope.onDispose(() => state.captchaUrl && URL.revokeObjectURL(state.captchaUrl));

  // ── small pieces of state → screen ──
  function say(kind, ...content) {
    message.dataset.state = kind;
    message.replaceChildren(...content);
    message.hidden = false;
  }

  function showSale(next) {
    sale = next;
    pill.replaceChildren(statusPill(sale.status));
    stock.replaceChildren(stockMeter(sale));
  }

  const BUTTON_TEXT = { checking: 'Loading…', upcoming: 'Opens at start', open: 'Buy now', busy: 'Buying…', polling: 'In the queue…' };
  function setPhase(phase, doneLabel = '') {
    state.phase = phase;
    state.doneLabel = doneLabel;
    page.dataset.phase = phase;
    renderButton();
  }

  function renderButton() {
    if (state.phase === 'retry') {
      const left = Math.max(1, Math.ceil((state.retryUntil - performance.now()) / 1000));
      buyButton.textContent = `Try again in ${left} s`;
      buyButton.dataset.retryIn = String(left);
    } else {
      buyButton.textContent = BUTTON_TEXT[state.phase] || state.doneLabel || 'Not available';
      delete buyButton.dataset.retryIn;
    }
    buyButton.disabled = state.phase !== 'open';
  }

  function pathValid() {
    return state.path && performance.now() < state.path.until - PATH_SAFETY_MS;
  }

  // ── the countdown: runs on serverNow(), never on Date.now() ──
  function tick() {
    if (state.phase === 'retry') {
      if (performance.now() >= state.retryUntil) {
        readyToBuy();
        say('info', 'You can try again now.');
      } else renderButton();
    }
    const now = serverNow();
    if (now < startsAt()) {
      countdownLabel.textContent = 'Starts in';
      countdown.textContent = formatDuration(startsAt() - now);
      return;
    }
    if (now >= endsAt()) {
      countdownLabel.textContent = 'The sale has ended';
      countdown.textContent = '';
      // A request in flight finishes on its own; its answer says what happened.
      if (!['done', 'busy', 'polling'].includes(state.phase)) {
        closeCaptcha();
        setPhase('done', 'Ended');
        if (message.dataset.state !== 'success') say('refusal', 'The sale has ended.');
      }
      return;
    }
    countdownLabel.textContent = 'Ends in';
    countdown.textContent = formatDuration(endsAt() - now);
    if (state.phase === 'upcoming') openSale();
  }

  /** The countdown reached zero: enable buying and fetch the captcha. */
  function openSale() {
    if (!session) {
      setPhase('open');
      return;
    }
    const wasIdle = document.activeElement === document.body || document.activeElement === title;
    readyToBuy();
    // The buyer is racing others: put the cursor where they type next,
    // unless they are busy elsewhere on the page.
    if (wasIdle) answer.focus();
  }

  /** Back to "open": reuse a still-valid hidden path, else show a fresh captcha. */
  function readyToBuy() {
    setPhase('open');
    if (pathValid()) {
      closeCaptcha('Captcha solved: press Buy now.');
    } else {
      state.path = null;
      loadCaptcha();
    }
  }

  function closeCaptcha(note = '') {
    captchaBox.hidden = true;
    // Disabled, not just hidden: a hidden control must not hold up the form.
    answer.disabled = true;
    captchaNote.textContent = note;
    captchaNote.hidden = !note;
  }

  async function loadCaptcha(byHand = false) {
    if (!session) return;
    const seq = ++state.captchaSeq;
    captchaBox.hidden = false;
    captchaNote.hidden = true;
    answer.disabled = false;
    answer.value = '';
    img.removeAttribute('src');
    img.classList.add('loading');
    try {
      const blob = await api(`/sales/${id}/captcha`, { auth: true, as: 'blob' });
      if (!viewScope.alive || seq !== state.captchaSeq) return; // a newer picture was asked for
      if (state.captchaUrl) URL.revokeObjectURL(state.captchaUrl);
      state.captchaUrl = URL.createObjectURL(blob);
      img.src = state.captchaUrl;
      img.classList.remove('loading');
      if (byHand) answer.focus();
    } catch (err) {
      if (viewScope.alive) say('error', `${err.detail} Press “New picture” to try again.`);
    }
  }

  // ── buying ──
  async function onBuy(event) {
    event.preventDefault();
    if (state.phase !== 'open') return;
    const needsPath = !pathValid();
    const typed = answer.value.trim();
    if (needsPath && !/^-?\d{1,12}$/.test(typed)) {
      say('error', 'Type the number that answers the sum in the picture.');
      answer.focus();
      return;
    }
    setPhase('busy');
    let stage = 'path';
    try {
      if (needsPath) {
        say('info', 'Checking your answer…');
        const issued = await api(`/sales/${id}/path`, { method: 'POST', auth: true, body: { captcha_answer: Number(typed) } });
        state.path = { value: issued.path, until: performance.now() + issued.expires_in * 1000 };
        closeCaptcha('Captcha solved.');
      }
      stage = 'seckill';
      say('info', 'Sending your order…');
      await api(`/seckill/${state.path.value}/${id}`, { method: 'POST', auth: true });
      if (!viewScope.alive) return;
      state.path = null;
      await pollResult();
    } catch (err) {
      if (viewScope.alive) await refused(err, stage);
    }
  }

  /** Turns a refusal into words and the next phase. */
  async function refused(err, stage) {
    if (!(err instanceof ApiError)) throw err;
    const { status, detail, retryAfter } = err;
    if (status === 401) return; // sessionEnded() already sent the buyer to log in
    if (status === 0 && stage === 'seckill') {
      // The POST may have arrived even though its answer did not.
      await afterUnavailable(detail, null);
    } else if (status === 0) {
      say('error', detail);
      readyToBuy();
    } else if (stage === 'path' && status === 400) {
      // Wrong answer or no captcha pending: that captcha is spent either way.
      say('refusal', detail, ' A new picture is shown below.');
      state.path = null;
      readyToBuy();
      answer.focus();
    } else if (status === 403) {
      say('refusal', detail, ' Solve the new captcha to get a fresh one.');
      state.path = null;
      readyToBuy();
      answer.focus();
    } else if (status === 410) {
      say('refusal', detail, ' Units come back on sale only if an order is cancelled or left unpaid.');
      closeCaptcha();
      setPhase('done', 'Sold out');
      refreshSale();
      watchForReturnedStock();
    } else if (status === 429) {
      const seconds = Math.max(1, retryAfter ?? 1);
      waitToRetry(seconds);
      say('refusal', detail, ` Wait ${seconds} s: the button counts down.`);
    } else if (status === 409 && (stage === 'path' || retryAfter != null)) {
      // "not active" / "not started yet": our view of the sale is off; ask again.
      say('refusal', detail);
      await resync();
    } else if (status === 409) {
      // Already bought or queued, or the sale ended: buying again cannot help.
      say('refusal', detail);
      closeCaptcha();
      setPhase('done', 'Not available');
      showExistingOrder();
    } else if (status === 503) {
      await afterUnavailable(detail, retryAfter);
    } else if (status === 404) {
      say('error', detail);
      closeCaptcha();
      setPhase('done', 'Not available');
    } else {
      say('error', detail);
      readyToBuy();
    }
  }

  /** Keeps the button disabled for the server's Retry-After, counting down. */
  function waitToRetry(seconds) {
    state.retryUntil = performance.now() + Math.max(1, seconds) * 1000;
    setPhase('retry');
  }

  /** 503: the order may have been placed after all, so look before retrying. */
  async function afterUnavailable(detail, retryAfter) {
    const result = await api(`/sales/${id}/result`, { auth: true }).catch(() => null);
    if (result && (result.status === 'success' || result.status === 'queued')) {
      await pollResult();
      return;
    }
    say('refusal', detail);
    waitToRetry(retryAfter ?? 2);
  }

  /** Polls the result every RESULT_POLL_MS until success or failed (bounded). */
  async function pollResult() {
    setPhase('polling');
    say('info', 'You are in the queue: waiting for your order…');
    const giveUpAt = performance.now() + RESULT_POLL_LIMIT_MS;
    while (viewScope.alive) {
      const result = await api(`/sales/${id}/result`, { auth: true }).catch((err) => (err.status === 401 ? 'stop' : null));
      if (result === 'stop' || !viewScope.alive) return;
      if (result?.status === 'success') {
        showSuccess(result.order_id);
        refreshSale();
        return;
      }
      if (result?.status === 'failed') {
        say('refusal', 'Your order could not be placed. You can try again.');
        readyToBuy();
        return;
      }
      if (performance.now() > giveUpAt) {
        say('info', 'Your order is still on its way. ', h('a', { href: '#/orders' }, 'Check My orders'), ' in a minute.');
        setPhase('done', 'Queued');
        return;
      }
      await viewScope.sleep(RESULT_POLL_MS);
    }
  }

  function showSuccess(orderId, before = 'Success! ') {
    closeCaptcha();
    say('success',
      h('strong', {}, before),
      'Your order ', h('code', { 'data-testid': 'order-id' }, orderId), ' is reserved. ',
      h('a', { href: '#/orders', 'data-testid': 'go-to-orders' }, 'Pay for it in My orders'), '.');
    setPhase('done', 'Bought');
  }

  /** After "already bought or queued": show that order if there is one. */
  async function showExistingOrder() {
    const result = await api(`/sales/${id}/result`, { auth: true }).catch(() => null);
    if (!viewScope.alive || !result) return;
    if (result.status === 'success') showSuccess(result.order_id, 'You already bought this. ');
    else if (result.status === 'queued') await pollResult();
  }

  /** Re-reads the sale (and the server clock) and picks the phase from it. */
  async function resync() {
    try {
      ({ sale, serverNow } = await loadSale(id));
    } catch (err) {
      say('error', err.detail);
      return;
    }
    if (!viewScope.alive) return;
    showSale(sale);
    const now = serverNow();
    if (now < startsAt()) {
      closeCaptcha('The captcha appears here when the sale opens.');
      setPhase('upcoming'); // tick() opens it again at zero
    } else if (now >= endsAt() || sale.status === 'ended') {
      closeCaptcha();
      setPhase('done', 'Ended');
    } else if (sale.status === 'sold_out') {
      closeCaptcha();
      setPhase('done', 'Sold out');
      watchForReturnedStock();
    } else readyToBuy(); // the last captcha was spent by the refused answer
  }

  /** Updates stock and status on screen, quietly. */
  async function refreshSale() {
    try {
      const fresh = await loadSale(id);
      if (!viewScope.alive) return;
      serverNow = fresh.serverNow;
      showSale(fresh.sale);
    } catch { /* the old numbers stay; nothing the buyer must act on */ }
  }

  /** Sold out is not final: cancelled or unpaid orders give units back. */
  function watchForReturnedStock() {
    if (state.watching) return;
    state.watching = true;
    viewScope.every(async () => {
      if (state.phase !== 'done' || state.doneLabel !== 'Sold out') return;
      await refreshSale();
      if (sale.status === 'active' && sale.stock_left > 0 && state.doneLabel === 'Sold out') {
        say('info', 'A unit is back on sale: you can try again.');
        readyToBuy();
      }
    }, SOLD_OUT_RECHECK_MS);
  }

  // ── start: the buyer's own result first, so a buyer who comes back (or
  // reloads) sees their order rather than a captcha; then the countdown ──
  setPhase('checking');
  tick();
  viewScope.every(tick, TICK_MS);
  if (session && (sale.status !== 'upcoming' || serverNow() >= startsAt())) {
    const result = await api(`/sales/${id}/result`, { auth: true }).catch(() => null);
    if (!viewScope.alive) return;
    if (result?.status === 'success') {
      showSuccess(result.order_id, 'You already bought this. ');
      return;
    }
    if (result?.status === 'queued') {
      await pollResult();
      return;
    }
  }
  if (state.phase === 'done') return; // tick() found the sale over
  if (sale.status === 'sold_out') {
    setPhase('done', 'Sold out');
    say('refusal', 'Sold out: every unit is reserved. Units come back only if an order is cancelled or left unpaid; this page checks again every few seconds.');
    watchForReturnedStock();
    return;
  }
  if (sale.status === 'ended') {
    setPhase('done', 'Ended');
    say('refusal', 'The sale has ended.');
    return;
  }
  setPhase('upcoming');
  tick(); // opens at once when the sale is already on
}

/* ───────────────────────── 5c. my orders ───────────────────────── */

const ORDER_LABELS = { unpaid: 'Unpaid', paid: 'Paid', closed: 'Closed', paying: 'Paying…' };
let openapiPaths = null; // fetched once, the first time My orders opens

/** True when the running API documents a wallet (it may not exist yet). */
async function walletExists() {
  if (!openapiPaths) {
    const doc = await api('/openapi.json');
    openapiPaths = new Set(Object.keys(doc.paths || {}));
  }
  return openapiPaths.has('/api/v1/wallet');
}

async function showWallet(slot) {
  // Asking /wallet blindly would 404 (a console error) where it is not built.
  if (!(await walletExists())) return;
  const wallet = await api('/wallet', { auth: true });
  slot.replaceChildren('Wallet balance: ', h('strong', {}, formatCents(wallet.balance_cents)),
    wallet.frozen_cents ? ` (${formatCents(wallet.frozen_cents)} held for payments)` : '');
  slot.hidden = false;
}

async function ordersView(root, _params, _query, viewScope) {
  const wallet = h('p', { class: 'wallet', 'data-testid': 'wallet-balance', hidden: true });
  const note = h('p', { class: 'muted', role: 'status' }, 'Loading your orders…');
  const list = h('ul', { class: 'orders', 'data-testid': 'order-list' });
  root.append(heading('My orders'), wallet, note, list);
  const refreshWallet = () => showWallet(wallet).catch(() => { /* the balance is extra; orders still work */ });
  refreshWallet();

  const [orders, sales] = await Promise.all([
    api('/orders', { auth: true }),
    api('/sales').catch(() => []), // only for titles: an order without one still shows
  ]);
  if (!viewScope.alive) return;
  const titles = new Map(sales.map((s) => [s.id, s.title]));
  note.hidden = orders.length > 0;
  note.replaceChildren('No orders yet. ', h('a', { href: '#/' }, 'See the sales'), '.');
  list.replaceChildren(...orders.map((order) => orderRow(order, { titles, viewScope, refreshWallet })));
}

/** One order as a list item; it re-renders itself after pay or cancel. */
function orderRow(initial, ctx) {
  let order = initial;
  const li = h('li', { class: 'order', 'data-testid': 'order-row' });
  const rowMessage = h('p', { class: 'row-message', role: 'status', 'data-testid': 'order-message' });

  function render() {
    li.dataset.orderId = order.id;
    li.dataset.status = order.status;
    const facts = [
      ['Order', h('code', {}, order.id)],
      ['Amount', formatCents(order.amount_cents)],
      ['Placed', formatTime(order.created_at)],
    ];
    if (order.status === 'unpaid') facts.push(['Pay by', formatTime(order.expires_at)]);
    if (order.paid_at) facts.push(['Paid', formatTime(order.paid_at)]);
    if (order.status === 'closed' && order.closed_at) {
      facts.push(['Closed', `${formatTime(order.closed_at)}${order.close_reason === 'timeout' ? ' (not paid in time)' : ' (cancelled)'}`]);
    }
    li.replaceChildren(
      h('div', { class: 'order-head' },
        h('h2', { class: 'order-title' }, ctx.titles.get(order.sale_id) || `Sale #${order.sale_id}`),
        h('span', { class: `pill pill-order-${order.status}`, 'data-testid': 'order-status' }, ORDER_LABELS[order.status] || order.status)),
      h('dl', { class: 'facts' }, facts.map(([k, v]) => h('div', {}, h('dt', {}, k), h('dd', {}, v)))),
      ...(order.status === 'unpaid' ? [actions()] : []),
      rowMessage);
  }

  function actions() {
    return h('div', { class: 'actions' },
      h('button', { type: 'button', 'data-testid': 'pay-button', onclick: pay }, `Pay ${formatCents(order.amount_cents)}`),
      h('button', { type: 'button', class: 'button-quiet', 'data-testid': 'cancel-button', onclick: askCancel }, 'Cancel order'));
  }

  function say(text) {
    rowMessage.textContent = text;
  }

  function setBusy(busy) {
    for (const b of li.querySelectorAll('button')) b.disabled = busy;
  }

  async function pay() {
    setBusy(true);
    say('Paying…');
    try {
      // A fresh key per attempt: a key names one pay request, and a replay of
      // an old key would only repeat that request's answer.
      const { key } = await api('/idempotency-key', { auth: true });
      const paid = await api(`/orders/${order.id}/pay`, { method: 'POST', auth: true, headers: { 'Idempotency-Key': key } });
      // 200 carries the order; an answer without one (202) is read back.
      order = paid?.id ? paid : await api(`/orders/${order.id}`, { auth: true });
      render();
      say(order.status === 'paying' ? 'Payment is being settled…' : 'Paid. Thank you!');
      if (order.status === 'paying') watchSettling();
      ctx.refreshWallet();
    } catch (err) {
      await failed(err);
    }
  }

  /** Cancelling loses the unit, so it takes a second, explicit press. */
  function askCancel() {
    const keep = h('button', { type: 'button', class: 'button-quiet', onclick: () => { render(); say(''); li.querySelector('[data-testid="cancel-button"]')?.focus(); } }, 'Keep it');
    const yes = h('button', { type: 'button', class: 'danger', 'data-testid': 'confirm-cancel-button', onclick: cancel }, 'Yes, cancel it');
    li.querySelector('.actions').replaceChildren(h('span', { class: 'confirm-text' }, 'Cancel this order?'), yes, keep);
    yes.focus();
  }

  async function cancel() {
    setBusy(true);
    say('Cancelling…');
    try {
      order = await api(`/orders/${order.id}/cancel`, { method: 'POST', auth: true });
      render();
      say('Cancelled. The unit went back on sale.');
    } catch (err) {
      await failed(err);
    }
  }

  /** A refused pay/cancel: say why, and show the order as it now is. */
  async function failed(err) {
    if (!(err instanceof ApiError)) throw err;
    if (err.status === 401) return;
    const text = err.detail;
    if (err.status === 409 || err.status === 404) {
      try {
        order = await api(`/orders/${order.id}`, { auth: true });
        render();
      } catch { /* keep the old row; the message below still explains */ }
    } else setBusy(false);
    say(text);
  }

  /** Message payment mode: "paying" settles by itself; look again until it does. */
  function watchSettling() {
    const until = performance.now() + 60_000;
    const check = async () => {
      try {
        order = await api(`/orders/${order.id}`, { auth: true });
      } catch { /* try again next round */ }
      render();
      if (order.status === 'paying' && performance.now() < until) ctx.viewScope.later(check, 1000);
      else if (order.status === 'paid') { say('Paid. Thank you!'); ctx.refreshWallet(); }
    };
    ctx.viewScope.later(check, 1000);
  }

  render();
  return li;
}

/* ───────────────────────── 5d. log in / register ───────────────────────── */

function field({ id, label, testid, help, ...attrs }) {
  const input = h('input', { id, name: id, 'data-testid': testid, 'aria-describedby': help ? `${id}-help` : null, ...attrs });
  return {
    input,
    node: h('div', { class: 'field' },
      h('label', { for: id }, label),
      input,
      help ? h('p', { id: `${id}-help`, class: 'muted small' }, help) : null),
  };
}

/** Shared by both forms: submit → action → next page, or the refusal in words. */
function authForm({ name, fields, submitText, action, next }) {
  const message = h('p', { class: 'message', role: 'status', 'data-testid': `${name}-message`, hidden: true });
  const submit = h('button', { type: 'submit', 'data-testid': `${name}-submit` }, submitText);
  const form = h('form', { class: 'auth-form', 'data-testid': `${name}-form` }, fields.map((f) => f.node), submit, message);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    submit.disabled = true;
    message.hidden = true;
    try {
      await action();
      location.replace(`#${next}`);
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      message.dataset.state = 'refusal';
      message.textContent = err.detail;
      message.hidden = false;
      submit.disabled = false;
      fields[0].input.focus();
    }
  });
  return form;
}

function loginView(root, _params, query) {
  const next = safeNext(query.get('next'));
  if (currentSession()) {
    location.replace(`#${next}`);
    return;
  }
  const username = field({ id: 'login-username', label: 'Username', testid: 'login-username', autocomplete: 'username', required: true, maxlength: 32 });
  const password = field({ id: 'login-password', label: 'Password', testid: 'login-password', type: 'password', autocomplete: 'current-password', required: true, minlength: 8, maxlength: 128 });
  root.append(heading('Log in'),
    query.get('reason') === 'expired' ? h('p', { class: 'message', 'data-state': 'info' }, 'Your session has ended. Please log in again.') : null,
    authForm({
      name: 'login', fields: [username, password], submitText: 'Log in', next,
      action: () => logIn(username.input.value.trim(), password.input.value),
    }),
    h('p', {}, 'New here? ', h('a', { href: `#/register?next=${encodeURIComponent(next)}`, 'data-testid': 'register-link' }, 'Create an account'), '.'));
}

function registerView(root, _params, query) {
  const next = safeNext(query.get('next'));
  const username = field({
    id: 'register-username', label: 'Username', testid: 'register-username', autocomplete: 'username', required: true,
    minlength: 3, maxlength: 32, pattern: '[A-Za-z0-9_]{3,32}', title: '3 to 32 letters, digits or _', help: '3 to 32 letters, digits or _.',
  });
  const password = field({
    id: 'register-password', label: 'Password', testid: 'register-password', type: 'password', autocomplete: 'new-password',
    required: true, minlength: 8, maxlength: 128, help: 'At least 8 characters.',
  });
  root.append(heading('Create an account'),
    authForm({
      name: 'register', fields: [username, password], submitText: 'Create account and log in', next,
      action: async () => {
        const name = username.input.value.trim();
        await api('/auth/register', { method: 'POST', body: { username: name, password: password.input.value } });
        // Registering is meant to lead straight to buying: log in at once.
        await logIn(name, password.input.value);
      },
    }),
    h('p', {}, 'Have an account? ', h('a', { href: `#/login?next=${encodeURIComponent(next)}` }, 'Log in'), '.'));
}

/* ───────────────────────── start ───────────────────────── */

document.querySelector('[data-skip]').addEventListener('click', (event) => {
  // The hash is the router's: skip by moving focus instead of by #main.
  event.preventDefault();
  main.focus();
});
window.addEventListener('hashchange', () => {
  renderAccount();
  route();
});
renderAccount();
route();
