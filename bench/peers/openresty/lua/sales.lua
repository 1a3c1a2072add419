-- This nginx's local view of the sales, as gateway/src/sale_directory.rs:
--
--   lookup(id) ──▶ lrucache hit? ──no──▶ HGETALL <sale>:info (one read per
--                    │                    id however many requests wait:
--                    ▼                    single flight on a semaphore)
--             snapshot (sale_info_ttl_ms) / unknown (1 s) / not ready
--   sold-out mark: ngx.shared dict, sold_out_mark_ttl_ms
--   events: announce() applies locally and PUBLISHes on <prefix>:events:sales;
--           follow() (a timer) SUBSCRIBEs and applies what others publish,
--           and forgets every copy after a (re)subscribe, like the gateway.
--
-- None of it is trusted for admission: admit.lua re-checks window and
-- stock atomically; a stale copy only costs an early 409/410.
local lrucache = require "resty.lrucache"
local semaphore = require "ngx.semaphore"
local cjson = require("cjson").new()
local resp = require "resp"

local tonumber, type = tonumber, type

local M = {}

local UNKNOWN_TTL = 1 -- s: absorbs floods of made-up ids, finds new sales fast
local CAPACITY = 100000

local prefix, info_ttl, mark_ttl, channel
local info = lrucache.new(CAPACITY) -- id -> snapshot, or false (no such sale)
local known = lrucache.new(CAPACITY) -- ids seen ready once: a vanished one is "not ready"
local inflight = {} -- id -> { sema, waiters, err } while one request reads Redis
local marks -- ngx.shared dict: id -> sold out

function M.configure(conf)
  prefix = conf.key_prefix
  info_ttl = conf.sale_info_ttl_ms / 1000
  mark_ttl = conf.sold_out_mark_ttl_ms / 1000
  channel = prefix .. ":events:sales"
  marks = ngx.shared[conf.marks_dict]
end

-- The snapshot in an HGETALL reply; nil when the hash is missing or lacks
-- the window (a half-written or foreign hash is not a sale).
local function parse_info(fields)
  local f = {}
  for i = 1, #fields, 2 do
    f[fields[i]] = fields[i + 1]
  end
  local function int(name)
    local v = f[name]
    return type(v) == "string" and v:match("^[+-]?%d+$") and tonumber(v) or nil
  end
  local s, e, t = int("starts_at_ms"), int("ends_at_ms"), int("stock_total")
  if not (s and e and t) then
    return nil
  end
  return { starts_at_ms = s, ends_at_ms = e, stock_total = t }
end

local function read(id)
  local fields, err = resp.command("HGETALL", prefix .. ":{sale:" .. id .. "}:info")
  if err then
    return nil, err
  end
  return parse_info(fields) or false
end

-- `id` is the decimal sale id (string). Returns nil (no such sale),
-- { ready = false, sold_out } or { ready = true, starts_at_ms, ends_at_ms,
-- stock_total, sold_out }; raises when Redis cannot be read.
function M.lookup(id)
  local snap = info:get(id)
  if snap == nil then
    local flight = inflight[id]
    if flight then
      flight.waiters = flight.waiters + 1
      flight.sema:wait(3)
      if flight.err then
        error(flight.err)
      end
      snap = info:get(id)
    end
    if snap == nil then
      flight = { sema = semaphore.new(), waiters = 0 }
      inflight[id] = flight
      local err
      snap, err = read(id)
      inflight[id] = nil
      flight.err = err
      if snap ~= nil then
        info:set(id, snap, snap and info_ttl or UNKNOWN_TTL)
      end
      if flight.waiters > 0 then
        flight.sema:post(flight.waiters)
      end
      if err then
        error(err)
      end
    end
  end
  local sold_out = marks:get(id) == true
  if snap then
    known:set(id, true)
    return { ready = true, starts_at_ms = snap.starts_at_ms, ends_at_ms = snap.ends_at_ms,
             stock_total = snap.stock_total, sold_out = sold_out }
  end
  if known:get(id) then
    return { ready = false, sold_out = sold_out }
  end
  return nil
end

-- A notice, applied here: "updated", "sold_out" or "reopened".
local function apply(id, kind)
  if kind == "updated" then
    info:delete(id)
    marks:delete(id)
  elseif kind == "sold_out" then
    marks:set(id, true, mark_ttl)
  elseif kind == "reopened" then
    marks:delete(id)
  end
end

-- Applies the notice here and tells every other gateway (raises on a
-- Redis error; callers pcall it, as the rule does).
function M.announce(id, kind)
  apply(id, kind)
  local _, err = resp.command("PUBLISH", channel,
    '{"sale_id":' .. id .. ',"kind":"' .. kind .. '"}')
  if err then
    error(err)
  end
end

function M.forget_all()
  info:flush_all()
  marks:flush_all()
end

local KINDS = { updated = true, sold_out = true, reopened = true }

local function follow_once()
  local sock, err = resp.connect()
  if not sock then
    return err
  end
  -- A subscriber waits for as long as nobody publishes.
  sock:settimeouts(1000, 1000, 2 ^ 31 - 1)
  local _, e = resp.call(sock, { "SUBSCRIBE", channel })
  if e then
    sock:close()
    return e
  end
  M.forget_all()
  ngx.log(ngx.INFO, "following sale events on ", channel)
  while true do
    local msg, rerr = resp.read_reply(sock)
    if rerr then
      sock:close()
      return rerr
    end
    if type(msg) == "table" and msg[1] == "message" then
      local ok, ev = pcall(cjson.decode, msg[3])
      local id = ok and type(ev) == "table" and ev.sale_id
      if type(id) == "number" and id >= 0 and id == math.floor(id) and KINDS[ev.kind] then
        apply(string.format("%d", id), ev.kind)
      else
        ngx.log(ngx.WARN, "ignoring a malformed sale event on ", channel)
      end
    end
  end
end

-- The subscriber, started from init_worker: resubscribes after any error,
-- forgetting what it may have missed meanwhile.
function M.follow(premature)
  if premature then
    return
  end
  while not ngx.worker.exiting() do
    local err = follow_once()
    if ngx.worker.exiting() then
      return -- a reload or stop closed the socket under us
    end
    ngx.log(ngx.WARN, "sale events subscription failed; retrying: ", tostring(err))
    M.forget_all()
    ngx.sleep(0.5)
  end
end

return M
