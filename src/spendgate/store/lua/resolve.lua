-- resolve.lua: find a wallet's chain (wallet up to the account) and the tree version it was read at.
--
-- KEYS[1]  the wallet's node hash
-- ARGV     none
--
-- Returns {'OK', topo, currency, time_zone, n, id_1, key_1, ..., id_n, key_n} (wallet first, account last)
--      or {'ERR', code, detail} with code NOT_FOUND or NOT_A_WALLET (detail: the node's kind).
--
-- Invariant: reads only. Every change of the tree bumps the account's topo, so a chain read here and checked
-- against topo by authorize.lua is never used after it changed.

local key = KEYS[1]
local kind = redis.call('HGET', key, 'kind')
if not kind then
  return {'ERR', 'NOT_FOUND', ''}
end
if kind ~= 'wallet' then
  return {'ERR', 'NOT_A_WALLET', kind}
end
local chain = {}
-- A tree deeper than 32 levels is refused when a plan is applied; the bound also stops a corrupted cycle.
for _ = 1, 32 do
  local v = redis.call('HMGET', key, 'id', 'kind', 'pkey', 'topo', 'cur', 'tz')
  chain[#chain + 1] = v[1]
  chain[#chain + 1] = key
  if v[2] == 'account' then
    local out = {'OK', v[4], v[5], v[6], int_str(#chain / 2)}
    for i = 1, #chain do out[#out + 1] = chain[i] end
    return out
  end
  if not v[3] then
    return {'ERR', 'NOT_FOUND', ''}
  end
  key = v[3]
end
return {'ERR', 'NOT_FOUND', 'cycle'}
