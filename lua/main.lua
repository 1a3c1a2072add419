-- Entry point of the gateway's rules. Returns the phase functions the
-- gateway calls for every request (see lua/README.md for the host API).
--
-- access(req): runs before the upstream or local answer. Return nothing to
--   let the request go on to its route's pool, or return
--   seckill.respond(...) / seckill.reject(...) to answer here.
-- log(req, res): optional, runs after the response has been sent. Not
--   defined here: the gateway's own metrics already count responses by
--   route and status, and a log phase costs a second rules call per request.
-- selftest(): runs once, in a fresh VM, before a reload is accepted.
-- routes: the route names the phases run for (optional: all routes).

local handlers = {
  -- route name (deploy/seckill.toml [[gateway.routes]] name) -> module
  seckill = require("seckill"),
}

-- The routes these rules run for: a request of any other route runs no
-- Lua at all (it goes straight to its pool). Leave `routes` out to run
-- access (and log) for every route.
local routes = {}
for name in pairs(handlers) do
  routes[#routes + 1] = name
end

return {
  routes = routes,

  access = function(req)
    local handler = handlers[req.route]
    if handler then
      return handler.access(req)
    end
  end,

  selftest = function()
    for name, handler in pairs(handlers) do
      assert(type(handler.access) == "function", name .. ".access must be a function")
    end
    return true
  end,
}
