-- The flash-sale admission route: POST /api/v1/seckill/{path}/{sale_id}.
--
-- The full admission (local sold-out mark, token bucket, one Redis script,
-- publish with confirm) is built on this route by the buyer-flow work; until
-- then the gateway refuses to admit anything rather than pretend to.
local M = {}

function M.access(req)
  return seckill.reject(503, "flash-sale admission is not enabled on this gateway",
    { ["retry-after"] = "5" })
end

return M
