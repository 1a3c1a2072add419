-- Rules for the gateway benchmark (bench/gateway/run), not for production.
--
-- Route `rule` (GET /bench/rule, JWT required): the shape of an admission
-- check without the sale logic: a local token bucket and one Redis script.
return {
  access = function(req)
    if req.route == "rule" then
      if not seckill.bucket("bench", 1e9, 1e9) then
        return seckill.reject(429, "bucket empty")
      end
      local n = seckill.redis("bench_incr", { seckill.key("bench:hits") })
      return seckill.respond(200, { n = n, user = req.user_id })
    end
  end,
}
