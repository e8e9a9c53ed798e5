-- delete_node.lua: remove one node (its children must already be gone), unless it still carries money.
--
-- KEYS[1]  the node's hash
-- KEYS[2]  the account's node hash
-- KEYS[3]  the deployment's node index entry for this node id (not hash-tagged)
-- KEYS[4]  the account's set of node ids
-- ARGV[1]  node_id
-- ARGV[2]  force             '1' to remove even with money held or spent in open windows
-- ARGV[3..5] day, week, month window ids open now
--
-- Returns {'OK', topo} or {'ERR', code, detail} with code NOT_FOUND or UNSAFE (detail: what
-- the node still carries).
--
-- Invariant: without force, no node with held money or spend in an open day/week/month window disappears;
-- every removal bumps the account's topo, so no cached chain outlives it.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'ERR', 'NOT_FOUND', ''}
end
if ARGV[2] ~= '1' then
  local held, spent = carried_money(KEYS[1], KEYS[2], ARGV[3], ARGV[4], ARGV[5])
  if held > 0 or spent > 0 then
    return {'ERR', 'UNSAFE', 'holds ' .. int_str(held) .. ' micros and spent ' .. int_str(spent) .. ' micros in open windows'}
  end
end
redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[3])
redis.call('SREM', KEYS[4], ARGV[1])
local topo = 0
if KEYS[1] ~= KEYS[2] then
  topo = redis.call('HINCRBY', KEYS[2], 'topo', 1)
end
return {'OK', int_str(topo)}
