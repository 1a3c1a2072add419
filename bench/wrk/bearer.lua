-- wrk script: send every request with the bearer token in $TOKEN.
local token = os.getenv("TOKEN")
wrk.headers["Authorization"] = "Bearer " .. token
