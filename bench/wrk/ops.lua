-- The /ops dashboard's poll: GET /ops/api/sales/{id} with the admin token
-- in $TOKEN (the URL names the sale).
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")
wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN")
