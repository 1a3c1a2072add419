-- Extends a named lock's expiry, but only for its owner: the holder's
-- watchdog calls it while the work goes on.
--
-- KEYS: 1 the lock key
-- ARGV: 1 the owner value, 2 the new time to live in milliseconds
--
-- Returns 1 renewed, 0 not held by this owner (expired or taken over)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
