-- The seckill route, POST /api/v1/seckill/{path}/{sale_id}, answered as the
-- gateway answers it: its edge steps (gateway/src/proxy/steps.rs) and then
-- the shipped rule (lua/seckill.lua), in their order, with their statuses,
-- details and Retry-After (contracts/src/admission_answers.rs):
--
--   body > max_body_bytes                       413 (nginx's check, our body)
--   GET/HEAD /healthz                           200 (no broker here: "none")
--   route: only the seckill path; POST only     404 / 405 + Allow: POST
--   JWT RS256 (jwt.lua)                         401 + WWW-Authenticate
--   a stored answer for this sale id            replayed (sold out 500 ms,
--                                               ended 5 s, as the rule stores)
--   a body that is not JSON                     400
--   sale id decimal, <= 2^53-1                  404 no such sale
--   path 32 lowercase hex                       403
--   local sale copy: unknown 404, not started 409 + Retry-After (time left),
--     ended 409, local sold-out mark 410
--   local token bucket for the sale             429 + Retry-After: 1
--   ONE EVALSHA of lua/redis/admit.lua          its outcome's answer
--   admitted                                    202 {"status":"queued",...}
--
-- The one thing left out: the gateway publishes an admitted order to
-- RabbitMQ and waits for the broker's confirm before its 202; this peer
-- answers the 202 as soon as the script admits (see README.md).
local jwt = require "jwt"
local resp = require "resp"
local sales = require "sales"
local rs256 = require "rs256"
local lrucache = require "resty.lrucache"
local ffi = require "ffi"
local base = require "resty.core.base"

local ngx = ngx
local ngx_var, ngx_header, ngx_now = ngx.var, ngx.header, ngx.now
local byte, find, format = string.byte, string.find, string.format
local floor, ceil, max = math.floor, math.ceil, math.max
local tostring, tonumber, pcall = tostring, tonumber, pcall

local M = {}

-- The rule's numbers (lua/seckill.lua; ops tune them there, so keep these
-- in step when comparing).
local USER_LIMIT = 5
local USER_WINDOW_MS = 1000
local BUCKET_RATE = 200000
local BUCKET_BURST = 50000
local SOLD_OUT_SHORTCUT_S = 0.5
local ENDED_SHORTCUT_S = 5

local conf -- set by M.init

---------------------------------------------------------------- answers --

-- The problem+json documents are built once, here: every refusal is a
-- constant string, byte for byte what the gateway sends (serde_json's
-- sorted keys: detail, status, title, type).
local TITLES = {
  [400] = "Bad Request", [401] = "Unauthorized", [403] = "Forbidden", [404] = "Not Found",
  [405] = "Method Not Allowed", [409] = "Conflict", [410] = "Gone", [413] = "Payload Too Large",
  [429] = "Too Many Requests", [500] = "Internal Server Error", [503] = "Service Unavailable",
}

local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    local named = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r",
                    ["\t"] = "\\t", ["\b"] = "\\b", ["\f"] = "\\f" }
    return named[c] or format("\\u%04x", byte(c))
  end) .. '"'
end

-- An answer: status, body, content type and extra headers, with what
-- send() needs precomputed (the length as a string, the headers as a flat
-- array), so sending a constant answer converts and traverses nothing.
local function answer(status, body, ctype, headers)
  local list = {}
  if headers then
    for k, v in pairs(headers) do
      list[#list + 1] = k
      list[#list + 1] = v
    end
  end
  return { status = status, body = body, ctype = ctype, headers = headers,
           length = tostring(#body), list = list, n = #list }
end

local function problem(status, detail, headers)
  return answer(status,
    '{"detail":' .. json_string(detail) .. ',"status":' .. status
      .. ',"title":"' .. TITLES[status] .. '","type":"about:blank"}',
    "application/problem+json", headers)
end

local A = {
  no_route = problem(404, "no route for this path"),
  not_allowed = problem(405, "this route does not accept that method", { allow = "POST" }),
  too_large = problem(413, "request body too large"),
  rule_error = problem(500, "rule error; see the gateway log for this request id"),
  bad_sale_id = problem(404, "no such sale"),
  malformed_path = problem(403, "the sale path is invalid or has expired"),
  unknown_sale = problem(404, "no such sale"),
  ended = problem(409, "the sale has ended"),
  sold_out = problem(410, "sold out"),
  gateway_limited = problem(429, "too many requests for this sale, please retry",
    { ["retry-after"] = "1" }),
  store_unavailable = problem(503, "the sale is unavailable, please retry",
    { ["retry-after"] = "1" }),
  bad_path = problem(403, "the sale path is invalid or has expired"),
  duplicate = problem(409, "you already bought or are queued for this sale"),
  stale_not_started = problem(409, "the sale has not started yet", { ["retry-after"] = "1" }),
  not_ready = problem(503, "the sale is not ready, please retry shortly",
    { ["retry-after"] = "2" }),
}
-- With a Retry-After computed per request.
local NOT_STARTED = "the sale has not started yet"
local LIMITED = "too many attempts, slow down"

-- One 401 per rejection detail, with the gateway's challenge.
local unauthorized = {}
local function unauthorized_for(detail, header_present)
  local key = header_present and detail or ""
  local a = unauthorized[key]
  if not a then
    a = problem(401, detail, { ["www-authenticate"] = header_present
      and ('Bearer error="invalid_token", error_description="' .. detail .. '"')
      or "Bearer" })
    unauthorized[key] = a
  end
  return a
end

local function retry_after_secs(ms)
  return tostring(max(1, ceil(ms / 1000)))
end

-------------------------------------------------------------- request id --

-- A UUIDv7 in simple form (32 hex digits), as the gateway's request ids:
-- 48 bits of Unix ms, then random bits from OpenSSL, drawn 4 KiB at a time.
local POOL = 4096
local pool = ffi.new("unsigned char[?]", POOL)
local pool_at = POOL

-- Written into rid_buf and sent from there (send with no rid): most
-- answers never need the id as a Lua string, and every string made per
-- request costs an interning. The buffer is the worker's, so it is only
-- valid until the request first yields: rid_string() copies it before.
local rid_buf = ffi.new("unsigned char[32]")
local DIGITS = {}
for i = 0, 15 do
  DIGITS[i] = byte("0123456789abcdef", i + 1)
end

local function request_id()
  if pool_at + 10 > POOL then
    rs256.random_bytes(pool, POOL)
    pool_at = 0
  end
  local p = pool + pool_at
  pool_at = pool_at + 10
  local ms = floor(ngx_now() * 1000)
  for i = 11, 0, -1 do
    rid_buf[i] = DIGITS[ms % 16]
    ms = floor(ms / 16)
  end
  local b = rid_buf + 12
  b[0], b[1] = DIGITS[7], DIGITS[p[0] % 16]
  b[2], b[3] = DIGITS[floor(p[1] / 16)], DIGITS[p[1] % 16]
  b[4], b[5] = DIGITS[8 + floor(p[2] % 64 / 16)], DIGITS[p[2] % 16]
  for i = 3, 9 do
    b[2 * i], b[2 * i + 1] = DIGITS[floor(p[i] / 16)], DIGITS[p[i] % 16]
  end
end

local function rid_string()
  return ffi.string(rid_buf, 32)
end

----------------------------------------------------------------- writing --

local RID_HEADER = "x-request-id"
local header_err = ffi.new("char *[1]")

-- `rid`: the request id as a string, or nil to send rid_buf.
local function send(a, rid)
  ngx.status = a.status
  local h = ngx_header
  h["content-type"] = a.ctype
  h["content-length"] = a.length
  if rid then
    h[RID_HEADER] = rid
  else
    -- What ngx.header[k] = v calls, given the bytes in place.
    ffi.C.ngx_http_lua_ffi_set_resp_header(base.get_request(), RID_HEADER, #RID_HEADER,
      false, rid_buf, 32, nil, 0, 1, header_err)
  end
  local list = a.list
  for i = 1, a.n, 2 do
    h[list[i]] = list[i + 1]
  end
  ngx.print(a.body)
end

-------------------------------------------------- shortcuts and buckets --

-- Answers the rule stores for a sale id (the raw path segment, as the
-- gateway keys them), replayed after the JWT check without running the rest.
local shortcuts = lrucache.new(100000)

-- One GCRA bucket per sale (gateway/src/limiter.rs): next-idle time.
local buckets = lrucache.new(100000)
local INTERVAL = 1 / BUCKET_RATE
local TOLERANCE = INTERVAL * (BUCKET_BURST - 1)

local function bucket_take(id)
  local now = ngx_now()
  local tat = buckets:get(id) or now
  if tat < now then
    tat = now
  end
  if tat - now > TOLERANCE then
    return false
  end
  buckets:set(id, tat + INTERVAL, 60)
  return true
end

------------------------------------------------------------------- rule --

local function sold_out(raw_id)
  shortcuts:set(raw_id, A.sold_out, SOLD_OUT_SHORTCUT_S)
  return A.sold_out
end

local function ended(raw_id)
  shortcuts:set(raw_id, A.ended, ENDED_SHORTCUT_S)
  return A.ended
end

-- lua/seckill.lua's M.access, for a verified user: the answer.
local function access(path, raw_id, user_id, rid)
  -- Decimal digits only, as the api reads sale ids ("0x7", "7e0" are not 7).
  local sale_id = find(raw_id, "^[1-9][0-9]*$") and tonumber(raw_id)
  if not sale_id or sale_id > 9007199254740991 then
    return A.bad_sale_id
  end
  if #path ~= 32 or not find(path, "^[0-9a-f]+$") then
    return A.malformed_path
  end

  local ok, sale = pcall(sales.lookup, raw_id)
  if not ok then
    ngx.log(ngx.ERR, "rule error: ", rid, ": ", tostring(sale))
    return A.rule_error
  end
  if not sale then
    return A.unknown_sale
  end
  if sale.ready then
    local now = floor(ngx_now() * 1000)
    if now < sale.starts_at_ms then
      return problem(409, NOT_STARTED,
        { ["retry-after"] = retry_after_secs(sale.starts_at_ms - now) })
    end
    if now >= sale.ends_at_ms then
      return ended(raw_id)
    end
    if sale.sold_out then
      return sold_out(raw_id)
    end
  end
  -- A sale that is not ready goes on to the script, which refuses it.

  if not bucket_take(raw_id) then
    return A.gateway_limited
  end

  local base = conf.key_prefix .. ":{sale:" .. raw_id .. "}:"
  local reply, err
  local sock
  sock, err = resp.connect()
  if sock then
    local server
    reply, err, server = resp.evalsha(sock, conf.admit_sha, conf.admit_source,
      { base .. "info", base .. "stock", base .. "buyers", base .. "resv",
        base .. "path:" .. user_id, base .. "limit:" .. user_id },
      { user_id, path, rid, USER_LIMIT, USER_WINDOW_MS })
    resp.release(sock, err ~= nil and not server)
  end
  if err or type(reply) ~= "table" then
    ngx.log(ngx.ERR, "admission script failed: ", tostring(err))
    return A.store_unavailable
  end

  local outcome = reply[1]
  if outcome == "admitted" then
    if reply[3] == 0 then
      -- The last unit: every gateway may stop asking Redis now.
      pcall(sales.announce, raw_id, "sold_out")
    end
    -- (The gateway publishes the order here and answers 202 on the
    -- broker's confirm; this peer does not publish.)
    return answer(202, '{"request_id":"' .. rid .. '","status":"queued"}',
      "application/json")
  elseif outcome == "sold_out" then
    pcall(sales.announce, raw_id, "sold_out")
    return sold_out(raw_id)
  elseif outcome == "duplicate" then
    return A.duplicate
  elseif outcome == "limited" then
    return problem(429, LIMITED, { ["retry-after"] = retry_after_secs(reply[2]) })
  elseif outcome == "bad_path" then
    return A.bad_path
  elseif outcome == "not_started" then
    -- This copy of the sale thought otherwise: it is stale.
    return A.stale_not_started
  elseif outcome == "ended" then
    return ended(raw_id)
  elseif outcome == "not_ready" then
    return A.not_ready
  end
  ngx.log(ngx.ERR, "rule error: ", rid, ": admit.lua returned an unknown outcome: ",
    tostring(outcome))
  return A.rule_error
end

---------------------------------------------------------------- handler --

-- Visible ASCII and tab only, as the http crate's HeaderValue::to_str;
-- any other byte makes the gateway see no Authorization at all.
local function readable(v)
  return not find(v, "[^\t\32-\126]")
end

-- An nginx variable as nginx holds it (pointer, length; nil when unset),
-- through the same call ngx.var uses, without copying it into a Lua
-- string: making a string per request (interning: hashing, walking its
-- hash chain, then collecting it) was the largest cost left on the hot
-- path, most of all for the ~600-byte Authorization.
local AUTH_VAR = "http_authorization"
local URI_VAR = "request_uri"
local value_ptr = ffi.new("unsigned char *[1]")
local value_len = ffi.new("size_t[1]")
local err_ptr = ffi.new("char *[1]")
local lowcase_buf = ffi.new("char[?]", 32)
local function var_in_place(name)
  local rc = ffi.C.ngx_http_lua_ffi_var_get(base.get_request(), name, #name, lowcase_buf, 0,
    value_ptr, value_len, err_ptr)
  if rc ~= 0 then
    return nil -- NGX_DECLINED: no such header (the URI is always set)
  end
  return value_ptr[0], tonumber(value_len[0])
end

local HEALTH = answer(200, '{"broker":"none","status":"ok"}', "application/json")

local ROUTE = "/api/v1/seckill/"
local ROUTE_LEN = #ROUTE

-- The bytes at `p` (at least #s of them) are s.
local function is_at(p, s)
  for i = 1, #s do
    if p[i - 1] ~= byte(s, i) then
      return false
    end
  end
  return true
end

-- content_by_lua for every request.
function M.handle()
  request_id()

  -- The raw request target up to its first "?", in place.
  local u, ulen = var_in_place(URI_VAR)
  local len = ulen
  for i = 0, ulen - 1 do
    if u[i] == 63 then
      len = i
      break
    end
  end
  local method = ngx.req.get_method()
  if len == 8 and is_at(u, "/healthz") and (method == "GET" or method == "HEAD") then
    return send(HEALTH)
  end
  -- "^/api/v1/seckill/([^/]+)/([^/]+)$" on bytes (string.match with a
  -- pattern is not compiled: it runs in the interpreter's matcher): the
  -- prefix, then exactly one more "/", with something on either side.
  local slash
  if len > ROUTE_LEN and is_at(u, ROUTE) then
    for i = ROUTE_LEN, len - 1 do
      if u[i] == 47 then
        if slash then
          slash = nil
          break
        end
        slash = i
      end
    end
  end
  if not slash or slash == ROUTE_LEN or slash == len - 1 then
    return send(A.no_route)
  end
  if method ~= "POST" then
    return send(A.not_allowed)
  end

  -- "Bearer <a token verified before>" skips the header scan and the
  -- trimming patterns (jwt.cached_bearer says why the answer is the same),
  -- and is read in place: no ~600-byte Lua string per request.
  local claims
  local p, n = var_in_place(AUTH_VAR)
  if p then
    claims = jwt.cached_bearer(p, n)
  end
  if not claims then
    local auth = p and ffi.string(p, n)
    if auth and not readable(auth) then
      auth = nil
    end
    local why
    claims, why = jwt.verify_header(auth)
    if not claims then
      return send(unauthorized_for(why, auth ~= nil))
    end
  end

  -- A short string, interned already once the sale has been asked for.
  local raw_id = ffi.string(u + slash + 1, len - slash - 1)
  local stored = shortcuts:get(raw_id)
  if stored then
    return send(stored)
  end

  -- From here on the request may yield (body, Redis): the id and the sale
  -- path become strings (the buffers are overwritten by other requests).
  local rid = rid_string()
  local path = ffi.string(u + ROUTE_LEN, slash - ROUTE_LEN)

  -- A local route's body is read and must be JSON when present (the rule
  -- does not use it). The parser's message differs from serde_json's.
  local declared = ngx_var.http_content_length
  if declared and declared ~= "0" or ngx_var.http_transfer_encoding then
    ngx.req.read_body()
    local body = ngx.req.get_body_data()
    if body and body ~= "" then
      local ok, e = pcall(conf.json_decode, body)
      if not ok then
        return send(problem(400, "malformed JSON body: " .. tostring(e)), rid)
      end
    end
  end

  return send(access(path, raw_id, claims.user_id, rid), rid)
end

-- error_page 413 (nginx's client_max_body_size, set to max_body_bytes).
function M.too_large()
  request_id()
  send(A.too_large)
end

-------------------------------------------------------------------- init --

local function hex(s)
  return (s:gsub(".", function(c) return format("%02x", byte(c)) end))
end

-- init_by_lua: everything read once; a bad key or file stops nginx here.
function M.init(c)
  local function slurp(p)
    local f, err = io.open(p, "rb")
    if not f then
      error("cannot read " .. p .. ": " .. tostring(err))
    end
    local s = f:read("*a")
    f:close()
    return s
  end
  conf = c
  local pems = {}
  for kid, p in pairs(c.public_keys) do
    pems[kid] = slurp(p)
  end
  jwt.configure {
    keys = pems, issuer = c.issuer, audience = c.audience,
    leeway_secs = c.leeway_secs, cache_entries = c.jwt_cache_entries,
  }
  resp.configure(c.redis)
  sales.configure(c)
  conf.admit_source = slurp(c.admit_script)
  conf.admit_sha = hex(ngx.sha1_bin(conf.admit_source))
  local cj = require("cjson").new()
  cj.decode_invalid_numbers(false)
  conf.json_decode = cj.decode
end

-- init_worker_by_lua: the sale events subscriber.
function M.init_worker()
  local ok, err = ngx.timer.at(0, sales.follow)
  if not ok then
    ngx.log(ngx.ERR, "cannot start the sale events subscriber: ", err)
  end
end

return M
