-- resolve.lua: find a wallet's chain (wallet up to the account) and the tree version it was read at.
--
-- KEYS[1]  the wallet's node hash
-- ARGV     none
--
-- Returns {'OK', topo, currency, time_zone, n, id_1, key_1, ..., id_n, key_n} (wallet first, account last)
--      or {'ERR', code, detail} with code NOT_FOUND or NOT_A_WALLET (detail: the node's kind).
--
-- Invariant: reads only. The server does not need this script to decide (authorize.lua walks a chain it was
-- not given, see walk_chain); the benchmark's raw-Redis phase records its script calls with it.

local chain, refused = walk_chain(KEYS[1])
if not chain then
  return refused
end
local out = {'OK', chain.topo, chain.cur, chain.tz, int_str(#chain.ids)}
for i = 1, #chain.ids do
  out[#out + 1] = chain.ids[i]
  out[#out + 1] = chain.keys[i]
end
return out
