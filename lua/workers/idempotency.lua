-- Consumes a pay idempotency key, or replays what its first use answered.
--
-- KEYS: 1 the key (`<prefix>:idem:<user_id>:<key>`, bound to one user)
-- ARGV: 1 action: "begin", "finish" or "abort"
--       2 order id
--       begin:  nothing more
--       finish: 3 HTTP status, 4 response body, 5 seconds to keep it
--       abort:  nothing more (the request failed on our side; the key may
--               be used again)
--
-- The key holds "issued" until first used, then "pending:<order_id>" while
-- that request runs, then "done:<order_id>:<status>:<body>".
--
-- begin returns  {"new"}                 the key was issued and is now ours
--                {"unknown"}             never issued, expired, or another user's
--                {"pending"}             the first request with it still runs
--                {"mismatch"}            the key was used for another order
--                {"replay", status, body} the first response, to send again
-- finish / abort return 1 when the key was pending for this order, else 0.
local v = redis.call('GET', KEYS[1])
local action, order = ARGV[1], ARGV[2]
if action == 'begin' then
  if not v then
    return {'unknown'}
  end
  if v == 'issued' then
    redis.call('SET', KEYS[1], 'pending:' .. order, 'KEEPTTL')
    return {'new'}
  end
  if v == 'pending:' .. order then
    return {'pending'}
  end
  local prefix = 'done:' .. order .. ':'
  if string.sub(v, 1, #prefix) == prefix then
    local rest = string.sub(v, #prefix + 1)
    local colon = string.find(rest, ':', 1, true)
    if colon then
      return {'replay', string.sub(rest, 1, colon - 1), string.sub(rest, colon + 1)}
    end
  end
  return {'mismatch'}
end
if v ~= 'pending:' .. order then
  return 0
end
if action == 'finish' then
  redis.call('SET', KEYS[1], 'done:' .. order .. ':' .. ARGV[3] .. ':' .. ARGV[4], 'EX', tonumber(ARGV[5]))
  return 1
end
if action == 'abort' then
  redis.call('SET', KEYS[1], 'issued', 'KEEPTTL')
  return 1
end
return redis.error_reply('unknown action ' .. tostring(action))
