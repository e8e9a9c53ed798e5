-- put_node.lua: create or reconfigure one node, keeping its counters.
--
-- KEYS[1]  the node's hash
-- KEYS[2]  the account's node hash (the same as KEYS[1] for the account itself)
-- KEYS[3]  the deployment's node index entry for this node id (not hash-tagged: it maps id -> account)
-- KEYS[4]  the deployment's set of account ids (not hash-tagged)
-- KEYS[5]  the parent's hash ('' for the account)
-- KEYS[6]  the account's set of node ids
-- ARGV[1]  account_id
-- ARGV[2..] field, value pairs of the node's configuration (see _lib.lua); config fields not given are
--          removed, so a limit dropped from a plan is dropped from the node. The freeze flag (frz) is the
--          exception: a plan may freeze a node, but only an unfreeze lifts a freeze, so re-applying a plan
--          never undoes an operator's (or the breaker's) freeze in an incident.
--
-- Returns {'OK', topo} or {'ERR', code, detail} with code OTHER_ACCOUNT (the id belongs to another account)
-- or NO_PARENT.
--
-- Invariant: every call bumps the account's topo, so no cached chain outlives a change of the tree.
-- The keys in KEYS[3] and KEYS[4] are global and this script is not cluster-safe; plans are applied through
-- a single node or a standalone Redis (an admin path, never the hot path).

local owner = redis.call('GET', KEYS[3])
if owner and owner ~= ARGV[1] then
  return {'ERR', 'OTHER_ACCOUNT', owner}
end
if KEYS[5] ~= '' and redis.call('EXISTS', KEYS[5]) == 0 then
  return {'ERR', 'NO_PARENT', ''}
end
local CONFIG = {'id', 'kind', 'parent', 'pkey', 'ptx', 'l:d', 'l:w', 'l:m', 'l:t', 'vel', 'svc', 'cur', 'tz', 'shd', 'brk'}
redis.call('HDEL', KEYS[1], unpack(CONFIG))
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('SET', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('SADD', KEYS[6], redis.call('HGET', KEYS[1], 'id'))
local topo = redis.call('HINCRBY', KEYS[2], 'topo', 1)
return {'OK', int_str(topo)}
