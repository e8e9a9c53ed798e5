-- node_activity.lua: what money a node carries now (for refusing unsafe moves and removals).
--
-- KEYS[1]  the node's hash
-- KEYS[2]  the account's node hash
-- ARGV[1..3] day, week, month window ids open now
--
-- Returns {'OK', held_micros, spent_micros} (spent: the largest of the open day/week/month windows)
--      or {'ERR', 'NOT_FOUND', ''}.
--
-- Invariant: reads only.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'ERR', 'NOT_FOUND', ''}
end
local held, spent = carried_money(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
return {'OK', int_str(held), int_str(spent)}
