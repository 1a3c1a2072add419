-- Hot-sale load: every request is POST /api/v1/seckill/{path}/{sale} as the
-- next buyer of $BENCH_USERS (lines "token path", see seckill-bench), so
-- users rotate like a real crowd; $SALE_ID names the sale. Several wrk
-- processes can share the crowd (`bench/run --cluster`, one per VIP):
-- $WRK_THREADS is the threads of all of them together and $WRK_FIRST
-- the number of this process's first thread among them.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")

local next_id = 0
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end

local users, n, i, step, sale
function init(args)
  users = {}
  for line in io.lines(os.getenv("BENCH_USERS")) do
    local token, path = line:match("^(%S+) (%S+)$")
    if token then
      users[#users + 1] = { "Bearer " .. token, path }
    end
  end
  n = #users
  sale = os.getenv("SALE_ID")
  -- Threads (of every process) interleave so together they walk the
  -- users in order.
  i = (id or 0) + tonumber(os.getenv("WRK_FIRST") or "0")
  step = tonumber(os.getenv("WRK_THREADS") or "2")
end

function request()
  local u = users[(i % n) + 1]
  i = i + step
  return wrk.format("POST", "/api/v1/seckill/" .. u[2] .. "/" .. sale,
    { ["Authorization"] = u[1], ["Content-Length"] = "0" })
end
