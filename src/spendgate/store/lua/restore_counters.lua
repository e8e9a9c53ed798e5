-- restore_counters.lua: set an account's spent counters from the ledger, and its held counters from the open
-- holds, after Redis lost them (rebuild) or at the embedded server's start (restore).
--
-- KEYS[1]    the account's holds zset
-- KEYS[2..]  the account's node hashes
-- ARGV[1..3] day, week, month window ids to restore (the total window's id is 'all')
-- ARGV[4..]  for each node of KEYS[2..], four integer strings: spent in the day, week, month and total
--            windows, in micro-units
--
-- Returns the number of nodes restored.
--
-- Invariant: afterwards every node's open windows count exactly the settled spend given and the money of
-- the open holds whose windows are those; wallets count their open holds again (hc).

local ids = {d = ARGV[1], w = ARGV[2], m = ARGV[3], t = 'all'}
local count = #KEYS - 1
for i = 1, count do
  local key = KEYS[1 + i]
  local base = 3 + (i - 1) * 4
  for j, w in ipairs(WINDOWS) do
    redis.call('HSET', key, w .. ':id', ids[w], w .. ':s', ARGV[base + j], w .. ':h', '0')
  end
  redis.call('HSET', key, 'hc', '0')
end
for _, hold_key in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local h = redis.call('HMGET', hold_key, 'st', 'amt', 'keys', 'win')
  if h[1] == tostring(HELD) then
    local keys = split(h[3], ',')
    local wins = split(h[4], ',')
    local hold_ids = {d = wins[1], w = wins[2], m = wins[3], t = 'all'}
    for _, key in ipairs(keys) do
      for _, w in ipairs(WINDOWS) do
        if redis.call('HGET', key, w .. ':id') == hold_ids[w] then
          redis.call('HINCRBY', key, w .. ':h', h[2])
        end
      end
    end
    if keys[1] and redis.call('EXISTS', keys[1]) == 1 then
      redis.call('HINCRBY', keys[1], 'hc', 1)
    end
  end
end
return count
