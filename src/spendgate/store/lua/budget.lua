-- budget.lua: read one node's limits and counters in the windows open now.
--
-- KEYS[1]  the node's hash
-- KEYS[2]  the account's node hash
-- KEYS[3]  the account's holds zset
-- ARGV[1]  now_ms            the caller's clock, milliseconds since the Unix epoch
-- ARGV[2..5] day, week, month, minute window ids at now_ms in the account's time zone
-- ARGV[6]  expire_count_max  how many expired holds to release first, so they do not show as held
-- ARGV[7]  retention_ms      how long a resolved hold record is kept
--
-- Returns {'OK', kind, parent, frozen_reason, services, per_transaction, velocity, velocity_used,
--          currency, time_zone, day_id, week_id, month_id,
--          then for d, w, m, t: limit ('' = none), spent, held}
--      or {'ERR', 'NOT_FOUND', ''}.
--
-- Invariant: reads only, apart from releasing expired holds as the sweeper would.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'ERR', 'NOT_FOUND', ''}
end
expire_due(KEYS[3], ARGV[1], tonumber(ARGV[6]), ARGV[7])
local wins = effective_windows(KEYS[2], {d = ARGV[2], w = ARGV[3], m = ARGV[4]})
local c = redis.call('HMGET', KEYS[1], 'kind', 'parent', 'frz', 'svc', 'ptx', 'vel', 'v:id', 'v:n')
local a = redis.call('HMGET', KEYS[2], 'cur', 'tz')
local velocity_used = '0'
if c[7] and c[7] >= ARGV[5] then
  velocity_used = c[8]
end
local out = {'OK', c[1], c[2] or '', c[3] or '', c[4] or '', c[5] or '', c[6] or '', velocity_used,
  a[1] or '', a[2] or '', wins.d, wins.w, wins.m}
for _, w in ipairs(WINDOWS) do
  local v = redis.call('HMGET', KEYS[1], 'l:' .. w, w .. ':id', w .. ':s', w .. ':h')
  out[#out + 1] = v[1] or ''
  if v[2] == wins[w] then
    out[#out + 1] = v[3] or '0'
    out[#out + 1] = v[4] or '0'
  else
    out[#out + 1] = '0'
    out[#out + 1] = '0'
  end
end
return out
