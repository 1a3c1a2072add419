-- One small script per request: count it.
return redis.call('INCR', KEYS[1])
