-- The gateway's access-token check (contracts/src/jwt.rs), step for step,
-- so a token gets the same 401 detail here as there:
--
--   Authorization: "Bearer <t>" (scheme case-insensitive; none or another
--   scheme: missing; "Bearer" alone: malformed)
--   size <= 8 KiB and only [A-Za-z0-9_.-]          else malformed
--   cache of verified tokens (lrucache, keyed by the token's SHA-256, each entry
--   living until exp + leeway; a hit past exp is "expired")
--   three segments; header: base64url JSON object  else malformed
--     alg exactly "RS256"                          else wrong algorithm
--     no "crit"                                    else malformed
--     kid a non-empty string naming a loaded key   else unknown key
--   signature base64url                            else malformed
--   RS256 over "header.payload"                    else bad signature
--   payload: base64url JSON object                 else malformed
--     exp nbf iss aud sub iat all present          else missing claim
--     sub/iss/aud strings, exp/nbf/iat unsigned integers, username a
--     string if present                           else malformed
--     iss, aud equal ours; exp + leeway >= now; nbf <= now + leeway
--     sub a positive decimal user id (u64)         else bad subject
--
-- Only successes are cached, so forged tokens cannot fill the cache.
local cjson = require("cjson").new()
local lrucache = require "resty.lrucache"
local rs256 = require "rs256"

local type, floor = type, math.floor
local byte, find, sub = string.byte, string.find, string.sub
local ngx_time = ngx.time

-- serde_json refuses NaN, Infinity and hex numbers; so do we.
cjson.decode_invalid_numbers(false)

local M = {}

-- Each rejection: the reason (the gateway's metric label) and the detail
-- (the 401 body and the WWW-Authenticate error_description).
M.MISSING = "a bearer token is required in the Authorization header"
M.MALFORMED = "the bearer token is not a well-formed JWT"
M.UNKNOWN_KEY = "the token is not signed with a known key"
M.WRONG_ALGORITHM = "the token must be signed with RS256"
M.BAD_SIGNATURE = "the token signature is invalid"
M.EXPIRED = "the token has expired"
M.NOT_YET_VALID = "the token is not valid yet"
M.WRONG_ISSUER = "the token was issued by an unexpected issuer"
M.WRONG_AUDIENCE = "the token is not meant for this service"
M.MISSING_CLAIM = "the token lacks a required claim"
M.BAD_SUBJECT = "the token subject is not a valid user id"

local MAX_TOKEN_BYTES = 8 * 1024
local MAX_LEEWAY_SECS = 5
local U64_MAX = "18446744073709551615"

local keys, issuer, audience, leeway, cache

-- Called once from init_by_lua with the PEMs already read:
-- { keys = { [kid] = pem, ... }, issuer, audience, leeway_secs, cache_entries }.
-- Errors (raised) stop nginx from starting, as a bad key stops the gateway.
function M.configure(conf)
  keys = {}
  local n = 0
  for kid, pem in pairs(conf.keys) do
    local pkey, err = rs256.load_public_key(pem)
    if not pkey then
      error("jwt: public key " .. kid .. " is unusable: " .. err)
    end
    keys[kid] = pkey
    n = n + 1
  end
  if n == 0 then
    error("jwt: no public keys configured")
  end
  issuer, audience = conf.issuer, conf.audience
  if issuer == "" or audience == "" then
    error("jwt: issuer and audience must not be empty")
  end
  leeway = math.min(conf.leeway_secs or 0, MAX_LEEWAY_SECS)
  cache = lrucache.new(math.max(conf.cache_entries or 100000, 1))
end

local function b64_json_object(segment)
  local raw = rs256.b64url_decode(segment)
  -- An object, not an array or a scalar (cjson decodes both to tables).
  if not raw or not find(raw, "^[ \t\r\n]*{") then
    return nil
  end
  local ok, v = pcall(cjson.decode, raw)
  if ok and type(v) == "table" then
    return v
  end
  return nil
end

local function unsigned(v)
  return type(v) == "number" and v >= 0 and v == floor(v) and v < 18446744073709551616
end

-- `sub` as the gateway reads it (Rust u64 parsing: an optional "+", leading
-- zeros allowed, at most 2^64-1, and not 0), in canonical decimal: the
-- form the Redis keys use.
local function user_id(s)
  local digits = s:match("^%+?(%d+)$")
  if not digits then
    return nil
  end
  digits = digits:gsub("^0+", "")
  if digits == "" or #digits > 20 or (#digits == 20 and digits > U64_MAX) then
    return nil
  end
  return digits
end
M.user_id = user_id

local function is_token_char(b)
  return (b >= 48 and b <= 57) or (b >= 65 and b <= 90) or (b >= 97 and b <= 122)
    or b == 45 or b == 46 or b == 95
end

-- The full check, on a cache miss: claims table or nil, detail.
local function verify_uncached(token)
  local d1 = find(token, ".", 1, true)
  local d2 = d1 and find(token, ".", d1 + 1, true)
  if not d2 or find(token, ".", d2 + 1, true) then
    return nil, M.MALFORMED
  end
  local header = b64_json_object(sub(token, 1, d1 - 1))
  if not header then
    return nil, M.MALFORMED
  end
  if header.alg ~= "RS256" then
    return nil, M.WRONG_ALGORITHM
  end
  if header.crit ~= nil then
    return nil, M.MALFORMED
  end
  local kid = header.kid
  if type(kid) ~= "string" or kid == "" then
    return nil, M.UNKNOWN_KEY
  end
  local key = keys[kid]
  if not key then
    return nil, M.UNKNOWN_KEY
  end
  local sig = rs256.b64url_decode(sub(token, d2 + 1))
  if not sig then
    return nil, M.MALFORMED
  end
  if not rs256.verify(key, sub(token, 1, d2 - 1), sig) then
    return nil, M.BAD_SIGNATURE
  end
  local c = b64_json_object(sub(token, d1 + 1, d2 - 1))
  if not c then
    return nil, M.MALFORMED
  end
  if c.exp == nil or c.nbf == nil or c.iss == nil or c.aud == nil or c.sub == nil
    or c.iat == nil then
    return nil, M.MISSING_CLAIM
  end
  if type(c.sub) ~= "string" or type(c.iss) ~= "string" or type(c.aud) ~= "string"
    or not unsigned(c.exp) or not unsigned(c.nbf) or not unsigned(c.iat)
    or (c.username ~= nil and type(c.username) ~= "string") then
    return nil, M.MALFORMED
  end
  if c.iss ~= issuer then
    return nil, M.WRONG_ISSUER
  end
  if c.aud ~= audience then
    return nil, M.WRONG_AUDIENCE
  end
  local now = ngx_time()
  if c.exp + leeway < now then
    return nil, M.EXPIRED
  end
  if c.nbf > now + leeway then
    return nil, M.NOT_YET_VALID
  end
  local uid = user_id(c.sub)
  if not uid then
    return nil, M.BAD_SUBJECT
  end
  return { user_id = uid, exp = c.exp }
end

-- A raw token: claims { user_id = "<decimal>", exp = n } or nil, detail.
function M.verify(token)
  local n = #token
  if n == 0 or n > MAX_TOKEN_BYTES then
    return nil, M.MALFORMED
  end
  local key = rs256.sha256(token)
  local hit = cache:get(key)
  if hit then
    if hit.exp + leeway < ngx_time() then
      cache:delete(key)
      return nil, M.EXPIRED
    end
    return hit
  end
  -- Only tokens not seen yet pay for the character scan.
  for i = 1, n do
    if not is_token_char(byte(token, i)) then
      return nil, M.MALFORMED
    end
  end
  local claims, err = verify_uncached(token)
  if claims then
    -- Until exp + leeway, as the gateway's cache (at least a moment, so a
    -- token at its very end is still cached and then answered "expired").
    cache:set(key, claims, math.max(claims.exp + leeway + 1 - ngx_time(), 0.001))
  end
  return claims, err
end

-- The hot path, on the header's bytes in place (`p`, `len`): a header
-- exactly "Bearer " .. T for a T in the cache and not expired: its
-- claims; nil for anything else (the caller then runs the full check,
-- which also answers "expired"). The same answer as the full check,
-- because a cached T was scanned whole before it was cached
-- ([A-Za-z0-9_.-] only): the header is readable, has nothing to trim, its
-- scheme is "Bearer" and its rest is T.
local BEARER = { byte("Bearer ", 1, 7) }
function M.cached_bearer(p, len)
  local n = len - 7
  if n <= 0 or n > MAX_TOKEN_BYTES then
    return nil
  end
  for i = 1, 7 do
    if p[i - 1] ~= BEARER[i] then
      return nil
    end
  end
  local hit = cache:get(rs256.sha256_at(p, 7, n))
  if hit and hit.exp + leeway >= ngx_time() then
    return hit
  end
  return nil
end

-- The Authorization header's value (or nil): claims, or nil, detail.
function M.verify_header(value)
  if value == nil then
    return nil, M.MISSING
  end
  value = value:match("^[ \t]*(.-)[ \t]*$")
  local scheme, rest = value:match("^([^ \t]*)[ \t]+(.*)$")
  if not scheme then
    scheme, rest = value, ""
  end
  if scheme:lower() ~= "bearer" then
    return nil, M.MISSING
  end
  if rest == "" then
    return nil, M.MALFORMED
  end
  return M.verify(rest)
end

return M
