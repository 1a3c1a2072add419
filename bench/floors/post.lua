-- wrk script of bench/floors/run: every request a seckill POST with the
-- bearer token in $TOKEN and the path in the URL (a malformed one, so the
-- rule refuses it without a Redis call).
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN")
