-- authorize.lua: decide one spend over a wallet's whole chain, atomically, and hold (or settle) the money.
--
-- KEYS[1]    the account's holds zset (hold keys scored by expiry, ms)
-- KEYS[2]    the account's ledger outbox stream
-- KEYS[3]    the idempotency record of this (wallet, idempotency key)
-- KEYS[4]    the hold to create
-- KEYS[5]    the account's event stream (the live feed; capped)
-- KEYS[6]    the caller's token record in this account (see check_token)
-- KEYS[7..]  the chain's node hashes: the wallet first, the account last; or the wallet's alone, with topo
--            '', for a wallet whose chain the caller has not resolved
-- ARGV[1]    now_ms              the caller's clock, milliseconds since the Unix epoch
-- ARGV[2]    topo                the account's tree version the caller resolved the chain at ('' for none)
-- ARGV[3]    amount_micros       positive integer string, at most 1e15
-- ARGV[4]    currency            ISO 4217 code
-- ARGV[5]    service             what is paid for ('' = unnamed)
-- ARGV[6]    capture             '1' to settle at once, '0' to hold
-- ARGV[7]    fingerprint         digest of the whole request, for exact idempotency
-- ARGV[8]    hold_ttl_ms         how long an uncaptured hold lives
-- ARGV[9]    idempotency_ttl_ms  how long the answer is kept for replays
-- ARGV[10]   retention_ms        how long a resolved hold record is kept (to answer late captures)
-- ARGV[11]   authorization_id    the id of the hold to create
-- ARGV[12..15] day, week, month, minute window ids at now_ms in the account's time zone
-- ARGV[16]   metadata            JSON object, stored for billing
-- ARGV[17]   idempotency_key     the client's key, stored for billing
-- ARGV[18]   expire_count_max    how many expired holds to release before deciding
-- ARGV[19]   alert_percents      comma-separated utilization thresholds that raise an alert, e.g. 50,80,100
-- ARGV[20]   events_length_max   the event stream's approximate cap
-- ARGV[21]   token_mode          '' (auth off), '*' (root token) or the caller's token hash
-- ARGV[22]   holds_per_wallet_max  the most open holds one wallet may have (a bound, not a limit: past it
--                                  the request is refused with HOLDS_EXHAUSTED, not denied)
-- ARGV[23]   time_zone           the account's time zone, in which the caller named the windows
-- ARGV[24..] the chain's node ids, in the order of KEYS[7..]
--
-- Returns {'OK', decision, authorization_id, reason, denied_node, denied_window, tight_node, tight_window,
--          tight_limit, tight_remaining, hold_expires_at_ms, hold_state, captured_micros, denied_limit,
--          denied_used, would_reason, would_node, would_window, replayed}, followed by topo, currency and the
--          chain's node ids (wallet first) when the script walked the chain itself (step 1)
--      or {'ERR', code, detail} with code UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, NOT_A_WALLET (detail:
--         the node's kind), STALE_CHAIN (the account's time zone is not ARGV[23]; detail: the zone),
--         IDEMPOTENCY_CONFLICT, CURRENCY_MISMATCH or HOLDS_EXHAUSTED; an error changes nothing (apart from
--         releasing expired holds, as the sweeper would).
-- decision: 1 approved, 2 denied. reason: 0 none, 1 frozen, 2 service not allowed, 3 per-transaction,
-- 4 velocity, 5 window (the precedence: a lower reason anywhere on the chain wins; within a reason the node
-- nearest the wallet, then day, week, month, total). Windows: 1 day, 2 week, 3 month, 4 total, 5 minute.
-- A node in shadow mode (shd=1) has its limits evaluated but not enforced: what it would have denied is
-- reported as would_reason / would_node / would_window. A freeze is always enforced.
-- After an approval: an alert event for each threshold a window crosses (once per window), and the
-- spend-rate breaker (brk = "multiplier,recent_minutes,trailing_minutes,min_spend_micros") freezes a node
-- whose spend over the recent minutes exceeds multiplier x its trailing average for as many minutes.
--
-- Invariant: an approval leaves every enforced limited window of every node with spent + held <= limit,
-- and holds that expired at or before now_ms never count against it.
--
-- A one-shot (capture=1) approval's hold record keeps only what a late Capture or Void of it reads: st, amt,
-- cap, ck and wal (see capture.lua and void.lua). Nothing else reads a settled hold: the sweeper, freeze.lua
-- and restore_counters.lua find holds through the holds zset, which a one-shot never enters.
--
-- Cost: Redis runs this script on its one thread for every authorization, so it keeps down the Redis calls,
-- the size of their replies and the Lua work (each table made, each C function called, each number parsed or
-- formatted counts): see the notes at each step. Behaviour is that of the plain reading of the steps.

local ARGV, KEYS, call, tonumber, unpack, format = ARGV, KEYS, redis.call, tonumber, unpack, string.format
local now_ms = ARGV[1]
local amount_str = ARGV[3]
local amount = tonumber(amount_str)
local capture = ARGV[6] == '1'
local FIXED = 6
local chain_length = #KEYS - FIXED
local ID0 = 23
local account_key = KEYS[#KEYS]
-- The chain's node keys are node_keys[key_base + i]: the caller's KEYS, or those of the walk in step 1.
local node_keys, key_base = KEYS, FIXED
local ids = {unpack(ARGV, ID0 + 1, ID0 + chain_length)}

-- A node is read with one HGETALL: a listpack hash is walked once, where an HMGET searches it once per field
-- asked (and most of the fields an authorization may need are usually absent, each a search of the whole
-- hash). The reads are made in RESP3, where HGETALL answers a map ({map = {field = value}}), so the fields
-- are looked up by name; a field the hash lacks is nil. A node's values v place the fields used, and places
-- 32 to 36 hold numbers worked out in step 4. Replies are RESP2 around the reads, as the library expects.
local setresp = redis.setresp
local function read_node(key)
  local m = call('HGETALL', key).map
  -- Made with its 36 places at once: Lua grows a table made empty by rehashing it at every power of two.
  return {m.frz, m.svc, m.ptx, m.vel, m['v:id'], m['v:n'],
    m['l:d'], m['d:id'], m['d:s'], m['d:h'], m['al:d'],
    m['l:w'], m['w:id'], m['w:s'], m['w:h'], m['al:w'],
    m['l:m'], m['m:id'], m['m:s'], m['m:h'], m['al:m'],
    m['l:t'], m['t:id'], m['t:s'], m['t:h'], m['al:t'],
    m.shd, m.brk, m.hc, m.topo, m.cur, nil, nil, nil, nil, nil}
end

-- 1. The chain the caller resolved must still be the account's tree. When it is not (the tree changed, or the
-- caller sent the wallet alone), the chain is walked here from the wallet, and the reply carries it: a wallet's
-- first call, or its first after a change of the tree, is still one round trip. The account's read serves
-- step 4 too. The walk comes before the token check: a wallet that is not in this account (the caller's
-- idea of its account is out of date) is NOT_FOUND, which the caller can put right, whatever its token.
setresp(3)
local account = read_node(account_key)
setresp(2)
local walked
if account[30] ~= ARGV[2] then
  local refused_walk
  walked, refused_walk = walk_chain(KEYS[FIXED + 1])
  if not walked then
    return refused_walk
  end
  if walked.tz ~= ARGV[ID0] then
    -- The windows in ARGV were named in another time zone.
    return {'ERR', 'STALE_CHAIN', tostring(walked.tz or false)}
  end
  node_keys, key_base, ids, chain_length = walked.keys, 0, walked.ids, #walked.ids
  if node_keys[chain_length] ~= account_key then
    -- The caller sent the wallet alone: what was read above is the wallet.
    account_key = node_keys[chain_length]
    setresp(3)
    account = read_node(account_key)
    setresp(2)
  end
end

-- The caller may act on this wallet.
local refused = check_token(ARGV[21], KEYS[6], ARGV[ID0 + 1])
if refused then
  return refused
end

-- An answer, with the walked chain after it (see the header).
local function answer(reply)
  if walked then
    reply[#reply + 1] = walked.topo
    reply[#reply + 1] = walked.cur
    for i = 1, chain_length do
      reply[#reply + 1] = ids[i]
    end
  end
  return reply
end

-- 2. Idempotency: the same key answers the same request once; a different request is refused. The record
-- is one string, "<fingerprint>\n<answer fields joined by tabs>".
local record = call('GET', KEYS[3])
if record then
  local newline = string.find(record, '\n', 1, true)
  if string.sub(record, 1, newline - 1) ~= ARGV[7] then
    return {'ERR', 'IDEMPOTENCY_CONFLICT', ''}
  end
  local replay = split(string.sub(record, newline + 1), '\t')
  replay[#replay + 1] = '1'
  return answer(replay)
end

if account[31] ~= ARGV[4] then
  return {'ERR', 'CURRENCY_MISMATCH', tostring(account[31] or false)}
end

-- 3. Expired holds give their money back before anything is counted. Every hold's chain ends at the account,
-- so the account is read again when any was released.
if expire_due(KEYS[1], now_ms, tonumber(ARGV[18]), ARGV[10]) > 0 then
  setresp(3)
  account = read_node(account_key)
  setresp(2)
end

-- The window ids in force: the account's when it already moved to a later window.
local wins = later_windows({d = account[8], w = account[13], m = account[18]},
  {d = ARGV[12], w = ARGV[13], m = ARGV[14]})
local day, week, month = wins.d, wins.w, wins.m
local WID = {day, week, month, 'all'}
local minute = ARGV[15]
local service = ARGV[5]

-- 4. Read every node once; the approval below writes each node once, from these values. Window j (1 day,
-- 2 week, 3 month, 4 total) of a node's values v, with base = 5 * j + 1: v[base + 1] its limit (made a number
-- here; nil when none), v[base + 2] its stored id, v[base + 3] and v[base + 4] its spent and held (strings;
-- numbers for a limited window in force), v[base + 5] its alert mark, and, for a limited window, v[31 + j]
-- what counts against the limit (nothing when the stored id is not the one in force). v[36]: the
-- transactions counted in the current minute. Counters are parsed only where needed: an unlimited window's
-- only in step 6, and only the one written.
local vals = {nil, nil, nil, nil}
setresp(3)
for i = 1, chain_length - 1 do
  vals[i] = read_node(node_keys[key_base + i])
end
setresp(2)
vals[chain_length] = account
for i = 1, chain_length do
  local v = vals[i]
  local velocity_used = 0
  if v[5] and v[5] >= minute and v[6] then
    velocity_used = tonumber(v[6]) or 0
  end
  v[36] = velocity_used
  for j = 1, 4 do
    local base = 5 * j + 1
    local limit = v[base + 1]
    if limit then
      limit = tonumber(limit)
      v[base + 1] = limit
      if limit then
        local used = 0
        if v[base + 2] == WID[j] then
          local spent, held = v[base + 3], v[base + 4]
          spent = spent == '0' and 0 or spent and tonumber(spent) or 0
          held = held == '0' and 0 or held and tonumber(held) or 0
          v[base + 3], v[base + 4] = spent, held
          used = spent + held
        end
        v[31 + j] = used
      end
    end
  end
end

if not capture and (vals[1][29] and tonumber(vals[1][29]) or 0) >= tonumber(ARGV[22]) then
  return {'ERR', 'HOLDS_EXHAUSTED', ARGV[22]}
end

-- 5. Decide, in order of precedence.
local reason, denied_node, denied_window, denied_limit, denied_used = 0, '', 0, 0, 0
local would_reason, would_node, would_window = 0, '', 0
-- Returns true when the objection denies; a shadow-mode node's objection is only recorded.
local function deny(code, i, window, limit, used)
  if vals[i][27] == '1' and code ~= 1 then
    if would_reason == 0 then
      would_reason, would_node, would_window = code, ids[i], window
    end
    return false
  end
  reason, denied_node, denied_window, denied_limit, denied_used = code, ids[i], window, limit, used
  return true
end

for i = 1, chain_length do
  local frozen = vals[i][1]
  if frozen and frozen ~= '' and deny(1, i, 0, 0, 0) then break end
end
if reason == 0 then
  for i = 1, chain_length do
    local services = vals[i][2]
    if services and services ~= '' then
      local allowed = false
      local list = split(services, '\n')
      for s = 1, #list do
        if list[s] == service then allowed = true break end
      end
      if not allowed and deny(2, i, 0, 0, 0) then break end
    end
  end
end
if reason == 0 then
  for i = 1, chain_length do
    local ptx = vals[i][3]
    if ptx and amount > tonumber(ptx) and deny(3, i, 0, tonumber(ptx), 0) then break end
  end
end
if reason == 0 then
  for i = 1, chain_length do
    local vel = vals[i][4]
    if vel and vals[i][36] + 1 > tonumber(vel) and deny(4, i, 5, tonumber(vel), vals[i][36]) then break end
  end
end
if reason == 0 then
  for i = 1, chain_length do
    local v = vals[i]
    for j = 1, 4 do
      local limit = v[5 * j + 2]
      if limit and v[31 + j] + amount > limit and deny(5, i, j, limit, v[31 + j]) then break end
    end
    if reason ~= 0 then break end
  end
end

-- 6. Apply an approval: hold (or settle) on every window of every node, count the transaction per minute,
-- raise alerts; each node is written with one HSET of the values read in step 4.
local authorization_id, hold_expires_at, hold_state, captured = '', 0, 0, 0
local chain_ids = table.concat(ids, ',')
if reason == 0 then
  authorization_id = ARGV[11]
  -- The counter an approval adds to: spent when it settles at once, else held.
  local COUNTER = capture and {'d:s', 'w:s', 'm:s', 't:s'} or {'d:h', 'w:h', 'm:h', 't:h'}
  local counter_at = capture and 3 or 4
  local percents
  -- One table serves every node's HSET (its first n places).
  local updates = {nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil}
  for i = 1, chain_length do
    local v = vals[i]
    local key = node_keys[key_base + i]
    local n = 0
    for j = 1, 4 do
      local base = 5 * j + 1
      local stored, wid = v[base + 2], WID[j]
      if stored == wid then
        local before = v[base + counter_at]
        if not v[base + 1] then
          -- Not parsed in step 4 (an unlimited window).
          before = before == '0' and 0 or before and tonumber(before) or 0
        end
        if before + amount < EXACT_MAX then
          updates[n + 1] = COUNTER[j]
          updates[n + 2] = format('%d', before + amount) -- int_str, without a Lua call per counter
          n = n + 2
        else
          -- Past 2^53 Lua's numbers are not exact; Redis's integers are.
          call('HINCRBY', key, COUNTER[j], amount_str)
        end
      elseif (not stored) or stored < wid then
        local w = WINDOWS[j]
        updates[n + 1] = w .. ':id'
        updates[n + 2] = wid
        updates[n + 3] = w .. ':s'
        updates[n + 4] = capture and amount_str or '0'
        updates[n + 5] = w .. ':h'
        updates[n + 6] = capture and '0' or amount_str
        n = n + 6
      end
      local limit = v[base + 1]
      if limit then
        local before, after = v[31 + j], v[31 + j] + amount
        -- Alerts (see alert_crossings); the thresholds are parsed once per call.
        if not percents then
          percents = alert_thresholds(ARGV[19])
        end
        local mark = alert_crossings(KEYS[5], ARGV[20], ids[i], j, wid, limit, before, after, now_ms, percents,
          v[base + 5])
        if mark then
          updates[n + 1] = 'al:' .. WINDOWS[j]
          updates[n + 2] = mark
          n = n + 2
        end
        v[31 + j] = after
      end
    end
    if v[4] then
      if v[5] and v[5] >= minute then
        updates[n + 1] = 'v:n'
        updates[n + 2] = int_str(v[36] + 1)
        n = n + 2
      else
        updates[n + 1] = 'v:id'
        updates[n + 2] = minute
        updates[n + 3] = 'v:n'
        updates[n + 4] = '1'
        n = n + 4
      end
    end
    if i == 1 and not capture then
      updates[n + 1] = 'hc'
      updates[n + 2] = int_str((v[29] and tonumber(v[29]) or 0) + 1)
      n = n + 2
    end
    if n > 0 then
      call('HSET', key, unpack(updates, 1, n))
    end
    if v[28] then
      breaker_step(KEYS[5], ARGV[20], {key = key, id = ids[i], breaker = v[28]}, tonumber(minute), amount_str,
        now_ms)
    end
  end
  local hold_key = KEYS[4]
  if capture then
    -- Settled at once: nothing is held; the record answers a late Capture or Void. States and event kinds
    -- are handed to Redis as text ('2' is CAPTURED): Redis would format a Lua number with snprintf.
    hold_state, captured = CAPTURED, amount
    call('HSET', hold_key, 'st', '2', 'amt', amount_str, 'cap', amount_str, 'ck', ARGV[17], 'wal', ids[1])
    call('PEXPIRE', hold_key, ARGV[10])
    outbox_add(KEYS[2], authorization_id, ids[chain_length], ids[1], chain_ids, amount_str, amount_str, ARGV[4],
      service, ARGV[16], now_ms, now_ms, day, week, month, ARGV[17], ARGV[17])
  else
    local expires_at = tonumber(now_ms) + tonumber(ARGV[8])
    hold_state, hold_expires_at = HELD, expires_at
    call('HSET', hold_key, 'st', '1', 'amt', amount_str, 'exp', int_str(expires_at), 'at', now_ms, -- '1': HELD
      'keys', table.concat(node_keys, ',', key_base + 1, key_base + chain_length), 'ids', chain_ids,
      'win', day .. ',' .. week .. ',' .. month, 'svc', service, 'md', ARGV[16], 'cur', ARGV[4], 'ik', ARGV[17],
      'wal', ids[1])
    call('ZADD', KEYS[1], int_str(expires_at), hold_key)
  end
end

-- 7. The tightest window on the chain after this decision.
local tight_node, tight_window, tight_limit, tight_remaining = '', 0, 0, -1
for i = 1, chain_length do
  local v = vals[i]
  for j = 1, 4 do
    local limit = v[5 * j + 2]
    if limit then
      local remaining = limit - v[31 + j]
      if remaining < 0 then remaining = 0 end
      if tight_remaining < 0 or remaining < tight_remaining then
        tight_node, tight_window, tight_limit, tight_remaining = ids[i], j, limit, remaining
      end
    end
  end
end
if tight_remaining < 0 then tight_remaining = 0 end

-- The answer. Codes (at most 5) are written from a table, amounts with int_str (0 needs no formatting).
local CODE = {'1', '2', '3', '4', '5'}
local result = {'OK', reason == 0 and '1' or '2', authorization_id, CODE[reason] or '0', denied_node,
  CODE[denied_window] or '0', tight_node, CODE[tight_window] or '0',
  tight_limit == 0 and '0' or int_str(tight_limit), tight_remaining == 0 and '0' or int_str(tight_remaining),
  hold_expires_at == 0 and '0' or int_str(hold_expires_at), CODE[hold_state] or '0',
  captured == 0 and '0' or int_str(captured), denied_limit == 0 and '0' or int_str(denied_limit),
  denied_used == 0 and '0' or int_str(denied_used), CODE[would_reason] or '0', would_node,
  CODE[would_window] or '0', '0'}
event_append(KEYS[5], ARGV[20], now_ms, '1', ids[1], chain_ids, amount_str, -- '1': EVENT_DECISION
  'dec', result[2], 'rsn', result[4], 'auth', authorization_id, 'win', result[6], 'by', denied_node)
-- The record keeps the answer without its last field (replayed), which a replay sets to '1'.
call('SET', KEYS[3], ARGV[7] .. '\n' .. table.concat(result, '\t', 1, 18), 'PX', ARGV[9])
return answer(result)
