-- authorize.lua: decide one spend over a wallet's whole chain, atomically, and hold (or settle) the money.
--
-- KEYS[1]    the account's holds zset (hold keys scored by expiry, ms)
-- KEYS[2]    the account's ledger outbox stream
-- KEYS[3]    the idempotency record of this (wallet, idempotency key)
-- KEYS[4]    the hold to create
-- KEYS[5]    the account's event stream (the live feed; capped)
-- KEYS[6]    the caller's token record in this account (see check_token)
-- KEYS[7..]  the chain's node hashes: the wallet first, the account last
-- ARGV[1]    now_ms              the caller's clock, milliseconds since the Unix epoch
-- ARGV[2]    topo                the account's tree version the caller resolved the chain at
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
-- ARGV[23..] the chain's node ids, in the order of KEYS[7..]
--
-- Returns {'OK', decision, authorization_id, reason, denied_node, denied_window, tight_node, tight_window,
--          tight_limit, tight_remaining, hold_expires_at_ms, hold_state, captured_micros, denied_limit,
--          denied_used, would_reason, would_node, would_window, replayed}
--      or {'ERR', code, detail} with code UNAUTHENTICATED, PERMISSION_DENIED, STALE_CHAIN,
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

local now_ms = ARGV[1]
local amount_str = ARGV[3]
local amount = tonumber(amount_str)
local capture = ARGV[6] == '1'
local FIXED = 6
local chain_length = #KEYS - FIXED
local ID0 = 22
local account_key = KEYS[#KEYS]

-- 0. The caller may act on this wallet.
local refused = check_token(ARGV[21], KEYS[6], ARGV[ID0 + 1])
if refused then
  return refused
end

-- 1. The chain the caller resolved must still be the account's tree.
local account = redis.call('HMGET', account_key, 'topo', 'cur', 'd:id', 'w:id', 'm:id')
if account[1] ~= ARGV[2] then
  return {'ERR', 'STALE_CHAIN', tostring(account[1])}
end

-- 2. Idempotency: the same key answers the same request once; a different request is refused. The record
-- is one string, "<fingerprint>\n<answer fields joined by tabs>".
local record = redis.call('GET', KEYS[3])
if record then
  local newline = string.find(record, '\n', 1, true)
  if string.sub(record, 1, newline - 1) ~= ARGV[7] then
    return {'ERR', 'IDEMPOTENCY_CONFLICT', ''}
  end
  local replay = split(string.sub(record, newline + 1), '\t')
  replay[#replay + 1] = '1'
  return replay
end

if account[2] ~= ARGV[4] then
  return {'ERR', 'CURRENCY_MISMATCH', tostring(account[2])}
end

-- 3. Expired holds give their money back before anything is counted.
expire_due(KEYS[1], now_ms, tonumber(ARGV[18]), ARGV[10])

local wins = later_windows({d = account[3], w = account[4], m = account[5]},
  {d = ARGV[12], w = ARGV[13], m = ARGV[14]})
local minute = ARGV[15]
local service = ARGV[5]

-- 4. Read every node once: one HMGET each. The approval below writes each node once, from these values.
local FIELDS = {'frz', 'svc', 'ptx', 'vel', 'v:id', 'v:n',
  'l:d', 'd:id', 'd:s', 'd:h', 'al:d', 'l:w', 'w:id', 'w:s', 'w:h', 'al:w',
  'l:m', 'm:id', 'm:s', 'm:h', 'al:m', 'l:t', 't:id', 't:s', 't:h', 'al:t', 'shd', 'brk', 'hc'}
local nodes = {}
for i = 1, chain_length do
  local v = redis.call('HMGET', KEYS[FIXED + i], unpack(FIELDS))
  local node = {key = KEYS[FIXED + i], id = ARGV[ID0 + i], frozen = v[1] and v[1] ~= '', services = v[2],
    ptx = v[3], vel = v[4], windows = {}, shadow = v[27] == '1', breaker = v[28], holds = num(v[29]),
    velocity_id = v[5]}
  node.velocity_used = (v[5] and v[5] >= minute) and num(v[6]) or 0
  for j, w in ipairs(WINDOWS) do
    local base = 6 + (j - 1) * 5
    local limit, wid = v[base + 1], v[base + 2]
    local window = {limit = limit and tonumber(limit) or nil, stored_id = wid, spent = 0, held = 0,
      alerted = v[base + 5]}
    if wid == wins[w] then
      window.spent, window.held = num(v[base + 3]), num(v[base + 4])
    end
    window.used = window.spent + window.held
    node.windows[w] = window
  end
  nodes[i] = node
end

if not capture and nodes[1].holds >= tonumber(ARGV[22]) then
  return {'ERR', 'HOLDS_EXHAUSTED', ARGV[22]}
end

-- 5. Decide, in order of precedence.
local reason, denied_node, denied_window, denied_limit, denied_used = 0, '', 0, 0, 0
local would_reason, would_node, would_window = 0, '', 0
-- Returns true when the objection denies; a shadow-mode node's objection is only recorded.
local function deny(code, node, window, limit, used)
  if node.shadow and code ~= 1 then
    if would_reason == 0 then
      would_reason, would_node, would_window = code, node.id, window
    end
    return false
  end
  reason, denied_node, denied_window, denied_limit, denied_used = code, node.id, window, limit, used
  return true
end

for _, node in ipairs(nodes) do
  if node.frozen and deny(1, node, 0, 0, 0) then break end
end
if reason == 0 then
  for _, node in ipairs(nodes) do
    if node.services and node.services ~= '' then
      local allowed = false
      for _, s in ipairs(split(node.services, '\n')) do
        if s == service then allowed = true break end
      end
      if not allowed and deny(2, node, 0, 0, 0) then break end
    end
  end
end
if reason == 0 then
  for _, node in ipairs(nodes) do
    if node.ptx and amount > tonumber(node.ptx) and deny(3, node, 0, tonumber(node.ptx), 0) then break end
  end
end
if reason == 0 then
  for _, node in ipairs(nodes) do
    if node.vel and node.velocity_used + 1 > tonumber(node.vel)
        and deny(4, node, 5, tonumber(node.vel), node.velocity_used) then
      break
    end
  end
end
if reason == 0 then
  for _, node in ipairs(nodes) do
    for _, w in ipairs(WINDOWS) do
      local window = node.windows[w]
      if window.limit and window.used + amount > window.limit
          and deny(5, node, WINDOW_CODE[w], window.limit, window.used) then
        break
      end
    end
    if reason ~= 0 then break end
  end
end

-- 6. Apply an approval: hold (or settle) on every window of every node, count the transaction per minute,
-- raise alerts; each node is written with one HSET of the values read in step 4.
local authorization_id, hold_expires_at, hold_state, captured = '', 0, 0, 0
if reason == 0 then
  authorization_id = ARGV[11]
  local kind = capture and 's' or 'h'
  local keys, ids = {}, {}
  for i, node in ipairs(nodes) do
    local updates = {}
    for _, w in ipairs(WINDOWS) do
      local window = node.windows[w]
      if window.stored_id == wins[w] then
        local before = capture and window.spent or window.held
        if before + amount < EXACT_MAX then
          updates[#updates + 1] = w .. ':' .. kind
          updates[#updates + 1] = int_str(before + amount)
        else
          -- Past 2^53 Lua's numbers are not exact; Redis's integers are.
          redis.call('HINCRBY', node.key, w .. ':' .. kind, amount_str)
        end
      elseif (not window.stored_id) or window.stored_id < wins[w] then
        updates[#updates + 1] = w .. ':id'
        updates[#updates + 1] = wins[w]
        updates[#updates + 1] = w .. ':s'
        updates[#updates + 1] = capture and amount_str or '0'
        updates[#updates + 1] = w .. ':h'
        updates[#updates + 1] = capture and '0' or amount_str
      end
      if window.limit then
        local alerted = alert_crossings(KEYS[5], ARGV[20], node, w, wins[w], window.limit, window.used,
          window.used + amount, now_ms, ARGV[19], window.alerted)
        if alerted then
          updates[#updates + 1] = 'al:' .. w
          updates[#updates + 1] = alerted
        end
      end
      window.used = window.used + amount
    end
    if node.vel then
      if node.velocity_id and node.velocity_id >= minute then
        updates[#updates + 1] = 'v:n'
        updates[#updates + 1] = int_str(node.velocity_used + 1)
      else
        updates[#updates + 1] = 'v:id'
        updates[#updates + 1] = minute
        updates[#updates + 1] = 'v:n'
        updates[#updates + 1] = '1'
      end
    end
    if i == 1 and not capture then
      updates[#updates + 1] = 'hc'
      updates[#updates + 1] = int_str(node.holds + 1)
    end
    if #updates > 0 then
      redis.call('HSET', node.key, unpack(updates))
    end
    if node.breaker then
      breaker_step(KEYS[5], ARGV[20], node, tonumber(minute), amount_str, now_ms)
    end
    keys[i], ids[i] = node.key, node.id
  end
  local hold_key = KEYS[4]
  local expires_at = tonumber(now_ms) + tonumber(ARGV[8])
  local chain_ids = table.concat(ids, ',')
  local window_ids = wins.d .. ',' .. wins.w .. ',' .. wins.m
  if capture then
    hold_state, captured = CAPTURED, amount
    redis.call('HSET', hold_key, 'st', CAPTURED, 'amt', amount_str, 'exp', int_str(expires_at), 'at', now_ms,
      'keys', table.concat(keys, ','), 'ids', chain_ids, 'win', window_ids, 'svc', service, 'md', ARGV[16],
      'cur', ARGV[4], 'ik', ARGV[17], 'wal', ids[1], 'cap', amount_str, 'ck', ARGV[17])
    redis.call('PEXPIRE', hold_key, ARGV[10])
    outbox_add(KEYS[2], {txn = authorization_id, chain = chain_ids, wallet = ids[1], captured = amount_str,
      authorized = amount_str, currency = ARGV[4], service = service, metadata = ARGV[16], authorized_at = now_ms,
      captured_at = now_ms, windows = window_ids, key = ARGV[17], capture_key = ARGV[17]})
  else
    hold_state, hold_expires_at = HELD, expires_at
    redis.call('HSET', hold_key, 'st', HELD, 'amt', amount_str, 'exp', int_str(expires_at), 'at', now_ms,
      'keys', table.concat(keys, ','), 'ids', chain_ids, 'win', window_ids, 'svc', service, 'md', ARGV[16],
      'cur', ARGV[4], 'ik', ARGV[17], 'wal', ids[1])
    redis.call('ZADD', KEYS[1], int_str(expires_at), hold_key)
  end
end

-- 7. The tightest window on the chain after this decision.
local tight_node, tight_window, tight_limit, tight_remaining = '', 0, 0, -1
for _, node in ipairs(nodes) do
  for _, w in ipairs(WINDOWS) do
    local window = node.windows[w]
    if window.limit then
      local remaining = math.max(0, window.limit - window.used)
      if tight_remaining < 0 or remaining < tight_remaining then
        tight_node, tight_window, tight_limit, tight_remaining = node.id, WINDOW_CODE[w], window.limit, remaining
      end
    end
  end
end
if tight_remaining < 0 then tight_remaining = 0 end

local result = {'OK', int_str(reason == 0 and 1 or 2), authorization_id, int_str(reason), denied_node,
  int_str(denied_window), tight_node, int_str(tight_window), int_str(tight_limit), int_str(tight_remaining),
  int_str(hold_expires_at), int_str(hold_state), int_str(captured), int_str(denied_limit), int_str(denied_used),
  int_str(would_reason), would_node, int_str(would_window)}
local chain_ids = {}
for i, node in ipairs(nodes) do chain_ids[i] = node.id end
event_append(KEYS[5], ARGV[20], now_ms, EVENT_DECISION, nodes[1].id, table.concat(chain_ids, ','), amount_str,
  'dec', result[2], 'rsn', result[4], 'auth', authorization_id, 'win', result[6], 'by', denied_node)
redis.call('SET', KEYS[3], ARGV[7] .. '\n' .. table.concat(result, '\t'), 'PX', ARGV[9])
result[#result + 1] = '0'
return result
