-- Releases a named lock, but only for its owner (compare-and-delete), so a
-- holder whose lock expired cannot delete the lock another worker took since.
--
-- KEYS: 1 the lock key
-- ARGV: 1 the owner value the caller set when it acquired the lock
--
-- Returns 1 released, 0 not held by this owner (expired or taken over)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
