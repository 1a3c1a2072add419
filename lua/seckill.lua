-- The flash-sale admission: POST /api/v1/seckill/{path}/{sale_id}.
--
-- The gateway has already verified the JWT (req.user_id). From cheapest to
-- dearest, each step turns most of the crowd away before the next:
--
--   1. the sale, from this gateway's local copy: unknown 404, not started or
--      ended 409, local sold-out mark 410 (no Redis at all once sold out,
--      and for a short while not even these rules: seckill.shortcut)
--   2. this gateway's token bucket for the sale: 429 when Redis would be
--      flooded beyond what the sale needs
--   3. ONE Redis script (lua/redis/admit.lua): fails closed when the sale's
--      keys are missing, re-checks the window, the hidden path, the
--      per-user sliding window, duplicates, and takes one unit of stock
--   4. seckill.enqueue: publish the order message and wait for the broker's
--      confirm: 202 only then; otherwise the gateway gives the unit back
--      (release.lua) and the buyer gets a 503 saying what happened
--
-- Ops tune the numbers below and reload (see lua/README.md).
local M = {}

-- Attempts one buyer may make per sale within the window (all gateways).
M.user_limit = 5
M.user_window_ms = 1000
-- Admission attempts per second this gateway lets through to Redis per
-- sale, and the burst it tolerates. Far above any stock, it only protects
-- Redis from a flood; the local sold-out mark does the real shedding.
M.bucket_rate = 200000
M.bucket_burst = 50000
-- Once sold out (or ended), the answer is stored in the gateway for this
-- long and replayed without running the rules (seckill.shortcut): the
-- crowd that keeps clicking costs almost nothing. Bounded so a unit that
-- comes back (a rollback, a cancel) is on sale again within it.
M.sold_out_shortcut_ms = 500
M.ended_shortcut_ms = 5000

local function retry_after_secs(ms)
  return tostring(math.max(1, math.ceil(ms / 1000)))
end

-- Every answer is counted by outcome (gateway_admission_decisions_total and
-- the /ops dashboard), under the names of the documented answers table.
local function decided(outcome, sale_id, answer)
  seckill.decision(outcome, sale_id)
  return answer
end

-- A stored answer carries its outcome, so its replays are counted too.
local function sold_out(req, sale_id)
  local answer = seckill.reject(410, "sold out")
  seckill.shortcut(req.route, "sale_id", req.params.sale_id, answer, M.sold_out_shortcut_ms,
    "sold_out", sale_id)
  return decided("sold_out", sale_id, answer)
end

local function ended(req, sale_id)
  local answer = seckill.reject(409, "the sale has ended")
  seckill.shortcut(req.route, "sale_id", req.params.sale_id, answer, M.ended_shortcut_ms,
    "ended", sale_id)
  return decided("ended", sale_id, answer)
end

-- After a failed publish the gateway has already tried to give the unit
-- back (seckill.enqueue does both, outside this call, so a timeout here
-- cannot strand the reservation); each outcome is told as it is.
local function not_enqueued(req, sale_id, stock_left, outcome, err, retry_after)
  seckill.counter("seckill_enqueue_failed")
  seckill.log("warn", "order not enqueued:", req.request_id, outcome, tostring(err))
  if outcome == "released" then
    if stock_left == 0 then
      seckill.shortcut_clear(req.route, "sale_id", req.params.sale_id)
      pcall(seckill.sale_event, sale_id, "reopened")
    end
    return decided("released", sale_id, seckill.reject(503,
      "the order could not be queued; nothing was reserved, please retry",
      { ["retry-after"] = "1" }))
  elseif outcome == "not_held" then
    return decided("not_held", sale_id, seckill.reject(503,
      "the order could not be confirmed as queued, and it may have been "
      .. "placed after all: check GET /api/v1/sales/" .. sale_id .. "/result before retrying",
      { ["retry-after"] = "1" }))
  end
  -- release_failed: the unit is still held for this request.
  return decided("release_failed", sale_id, seckill.reject(503,
    "the order could not be queued and your reservation could not be "
    .. "given back yet; it is released automatically within " .. retry_after .. " s, and a retry "
    .. "before then is refused as already queued",
    { ["retry-after"] = tostring(retry_after) }))
end

local function admitted(req, sale_id, reply)
  local rid = req.request_id
  local stock_left = reply[3]
  if stock_left == 0 then
    -- The last unit: every gateway may stop asking Redis now.
    pcall(seckill.sale_event, sale_id, "sold_out")
  end
  local outcome, err, retry_after = seckill.enqueue({
    message_id = rid,
    sale_id = sale_id,
    user_id = req.user_id,
    admitted_at_ms = reply[2],
  })
  -- "claimed": the publish failed but a worker already took the message.
  if outcome == "queued" or outcome == "claimed" then
    return decided("queued", sale_id, seckill.respond(202, { status = "queued", request_id = rid }))
  end
  return not_enqueued(req, sale_id, stock_left, outcome, err, retry_after)
end

-- Redis failed or did not answer in time: nothing was decided, retry.
local function store_unavailable(sale_id, what, err)
  seckill.log("error", what .. " failed:", tostring(err))
  return decided("store_unavailable", sale_id,
    seckill.reject(503, "the sale is unavailable, please retry", { ["retry-after"] = "1" }))
end

function M.access(req)
  -- Decimal digits only, as the api reads sale ids: tonumber alone would
  -- also take "0x7" or "7e0" for sale 7.
  local raw_id = req.params.sale_id
  local sale_id = raw_id:match("^[1-9][0-9]*$") and tonumber(raw_id)
  if not sale_id or sale_id > 9007199254740991 then
    return decided("bad_sale_id", nil, seckill.reject(404, "no such sale"))
  end
  local path = req.params.path
  if #path ~= 32 or not path:match("^[0-9a-f]+$") then
    return decided("malformed_path", sale_id,
      seckill.reject(403, "the sale path is invalid or has expired"))
  end

  -- The local copy is re-read from Redis once per TTL; when Redis does not
  -- answer, fail closed.
  local found, sale = pcall(seckill.sale, sale_id)
  if not found then
    return store_unavailable(sale_id, "sale lookup", sale)
  end
  if not sale then
    return decided("unknown_sale", nil, seckill.reject(404, "no such sale"))
  end
  if sale.ready then
    local now = seckill.now_ms()
    if now < sale.starts_at_ms then
      return decided("not_started", sale_id, seckill.reject(409, "the sale has not started yet",
        { ["retry-after"] = retry_after_secs(sale.starts_at_ms - now) }))
    end
    if now >= sale.ends_at_ms then
      return ended(req, sale_id)
    end
    if sale.sold_out then
      return sold_out(req, sale_id)
    end
  end
  -- A sale that is not ready goes on to the script, which refuses it.

  if not seckill.bucket("seckill:" .. sale_id, M.bucket_rate, M.bucket_burst) then
    return decided("gateway_limited", sale_id, seckill.reject(429,
      "too many requests for this sale, please retry", { ["retry-after"] = "1" }))
  end

  local keys = seckill.sale_keys(sale_id, req.user_id)
  local ok, reply = pcall(seckill.redis, "admit",
    { keys.info, keys.stock, keys.buyers, keys.reservations, keys.path, keys.limit },
    req.user_id, path, req.request_id, M.user_limit, M.user_window_ms)
  if not ok then
    return store_unavailable(sale_id, "admission script", reply)
  end

  local outcome = reply[1]
  if outcome == "admitted" then
    return admitted(req, sale_id, reply)
  elseif outcome == "sold_out" then
    pcall(seckill.sale_event, sale_id, "sold_out")
    return sold_out(req, sale_id)
  elseif outcome == "duplicate" then
    return decided("duplicate", sale_id,
      seckill.reject(409, "you already bought or are queued for this sale"))
  elseif outcome == "limited" then
    return decided("limited", sale_id, seckill.reject(429, "too many attempts, slow down",
      { ["retry-after"] = retry_after_secs(reply[2]) }))
  elseif outcome == "bad_path" then
    return decided("bad_path", sale_id,
      seckill.reject(403, "the sale path is invalid or has expired"))
  elseif outcome == "not_started" then
    -- This gateway's copy of the sale thought otherwise: it is stale.
    return decided("not_started", sale_id,
      seckill.reject(409, "the sale has not started yet", { ["retry-after"] = "1" }))
  elseif outcome == "ended" then
    return ended(req, sale_id)
  elseif outcome == "not_ready" then
    return decided("not_ready", sale_id, seckill.reject(503,
      "the sale is not ready, please retry shortly", { ["retry-after"] = "2" }))
  end
  error("admit.lua returned an unknown outcome: " .. tostring(outcome))
end

return M
