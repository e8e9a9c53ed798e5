-- expire.lua: the sweeper's step: release an account's holds that expired.
--
-- KEYS[1]  the account's holds zset
-- ARGV[1]  now_ms        the caller's clock, milliseconds since the Unix epoch
-- ARGV[2]  count_max     the most holds to release in this call (the sweeper calls again while it is full)
-- ARGV[3]  retention_ms  how long a resolved hold record is kept
--
-- Returns the number of holds released.
--
-- Invariant: an expired hold's money goes back to every window of every node it was counted in, once.

return expire_due(KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3])
