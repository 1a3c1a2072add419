-- Entry point of the gateway's rules. Returns the phase functions the
-- gateway calls for every request (see lua/README.md for the host API).
--
-- access(req): runs before the upstream or local answer. Return nothing to
--   let the request go on to its route's pool, or return
--   seckill.respond(...) / seckill.reject(...) to answer here.
-- log(req, res): runs after the response has been sent.
-- selftest(): runs once, in a fresh VM, before a reload is accepted.

local handlers = {
  -- route name (deploy/seckill.toml [[gateway.routes]] name) -> module
  seckill = require("seckill"),
}

return {
  access = function(req)
    local handler = handlers[req.route]
    if handler then
      return handler.access(req)
    end
  end,

  log = function(req, res)
    if res.status >= 500 then
      seckill.counter("responses_5xx")
    end
  end,

  selftest = function()
    for name, handler in pairs(handlers) do
      assert(type(handler.access) == "function", name .. ".access must be a function")
    end
    return true
  end,
}
