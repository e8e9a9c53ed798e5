-- _lib.lua: routines shared by every spendgate script. The store prepends this file to each script when it
-- loads them, so every script is still one EVALSHA and one atomic step.
--
-- Data model (all keys of an account share the hash tag {<account>}; spendgate/store/keys.py builds them):
--   node hash   config: kind, parent, pkey (the parent's key), ptx (per-transaction limit), l:d l:w l:m l:t
--               (window limits), vel (transactions per minute), svc (allowed services, "\n"-joined),
--               frz (frozen reason; empty = not frozen); on the account also cur, tz and topo (bumped on
--               every change of the tree, so a cached chain can be checked).
--               counters: <w>:id, <w>:s (spent), <w>:h (held) for w in d, w, m, t; v:id, v:n for velocity.
--   hold hash   st (1 held, 2 captured, 3 voided, 4 expired), amt, cap, ck, exp, at, keys, ids, win, svc, md,
--               cur, ik, wal.
--   holds zset  hold keys scored by expiry (ms), for the sweeper and for releasing expired holds on the fly.
--
-- Money: amounts and limits are at most 1e15 micro-units (checked in Python), so spent + held + amount stays
-- below 2^53 and Lua's double arithmetic is exact. Numbers handed to redis.call are always formatted with
-- int_str, never left to Lua's number-to-string conversion.

local WINDOWS = {'d', 'w', 'm', 't'}
local HELD, CAPTURED, VOIDED, EXPIRED = 1, 2, 3, 4

local function int_str(n)
  return string.format('%d', n)
end

local function num(value)
  return tonumber(value) or 0
end

local function split(text, separator)
  local out = {}
  if text == nil or text == false or text == '' then
    return out
  end
  local start = 1
  while true do
    local at = string.find(text, separator, start, true)
    if not at then
      out[#out + 1] = string.sub(text, start)
      return out
    end
    out[#out + 1] = string.sub(text, start, at - 1)
    start = at + #separator
  end
end

-- Lua numbers are doubles: integers are exact below 2^53.
local EXACT_MAX = 9007199254740992

-- The window ids in force for an account: the caller's (from its clock) unless the account already moved
-- to a later window (a replica whose clock is slightly behind). The account node is touched by every
-- authorization, so its ids are the latest any node of the account has; using them keeps all nodes of a
-- chain in the same windows, and a window never goes back. stored: the account's d:id, w:id, m:id.
local function later_windows(stored, requested)
  local out = {t = 'all'}
  for _, name in ipairs({'d', 'w', 'm'}) do
    local current = stored[name]
    if current and current > requested[name] then
      out[name] = current
    else
      out[name] = requested[name]
    end
  end
  return out
end

local function effective_windows(account_key, requested)
  local stored = redis.call('HMGET', account_key, 'd:id', 'w:id', 'm:id')
  return later_windows({d = stored[1], w = stored[2], m = stored[3]}, requested)
end

-- A wallet counts its open holds (field hc), so their number can be bounded. A wallet deleted while it had
-- holds is not brought back by the count.
local function hold_count_down(wallet_key)
  if wallet_key and redis.call('EXISTS', wallet_key) == 1 then
    redis.call('HINCRBY', wallet_key, 'hc', -1)
  end
end

-- Give a held hold's money back to every node of its chain and mark it with final state `state`.
local function release_hold(hold_key, holds_key, state, retention_ms)
  local h = redis.call('HMGET', hold_key, 'amt', 'keys', 'win')
  local amount = h[1]
  local keys = split(h[2], ',')
  local wins = split(h[3], ',')
  local ids = {d = wins[1], w = wins[2], m = wins[3], t = 'all'}
  for i = 1, #keys do
    for _, w in ipairs(WINDOWS) do
      local current = redis.call('HGET', keys[i], w .. ':id')
      if current == ids[w] then
        redis.call('HINCRBY', keys[i], w .. ':h', '-' .. amount)
      end
    end
  end
  redis.call('HSET', hold_key, 'st', state)
  redis.call('ZREM', holds_key, hold_key)
  redis.call('PEXPIRE', hold_key, retention_ms)
  hold_count_down(keys[1])
  return amount
end

-- Release up to `count_max` holds of an account that expired at or before now_ms. Returns how many.
local function expire_due(holds_key, now_ms, count_max, retention_ms)
  local due = redis.call('ZRANGEBYSCORE', holds_key, '-inf', now_ms, 'LIMIT', '0', count_max)
  for i = 1, #due do
    local hold_key = due[i]
    if redis.call('HGET', hold_key, 'st') == '1' then -- HELD
      release_hold(hold_key, holds_key, EXPIRED, retention_ms)
    else
      -- A hold resolved some other way but still indexed (should not happen); drop the stale index entry.
      redis.call('ZREM', holds_key, hold_key)
    end
  end
  return #due
end

-- Append a settled transaction to the account's ledger outbox. The entry carries everything billing needs;
-- the stream is never trimmed here (the ledger writer trims only what it has acknowledged).
-- The fields in order: txn_id, account_id, wallet_id, chain, amount_micros (captured), authorized_micros,
-- currency, service, metadata, authorized_at_ms, captured_at_ms, day, week, month, idempotency_key,
-- capture_idempotency_key. Positional, so an authorization adds its entry without building a table or
-- splitting the chain and window ids it already has.
local function outbox_add(outbox_key, txn, account_id, wallet, chain, captured, authorized, currency, service,
    metadata, authorized_at, captured_at, day, week, month, key, capture_key)
  return redis.call('XADD', outbox_key, '*',
    'txn_id', txn,
    'account_id', account_id,
    'wallet_id', wallet,
    'chain', chain,
    'amount_micros', captured,
    'authorized_micros', authorized,
    'currency', currency,
    'service', service,
    'metadata', metadata,
    'authorized_at_ms', authorized_at,
    'captured_at_ms', captured_at,
    'day', day,
    'week', week,
    'month', month,
    'idempotency_key', key,
    'capture_idempotency_key', capture_key)
end

-- The same, for a hold captured after its authorization: the entry is built from the hold's record.
local function outbox_append(outbox_key, hold_key, txn_id, captured, now_ms)
  local h = redis.call('HMGET', hold_key, 'ids', 'wal', 'amt', 'cur', 'svc', 'md', 'at', 'win', 'ik', 'ck')
  local chain = split(h[1], ',')
  local wins = split(h[8], ',')
  return outbox_add(outbox_key, txn_id, chain[#chain], h[2], h[1], captured, h[3], h[4], h[5], h[6], h[7], now_ms,
    wins[1], wins[2], wins[3], h[9], h[10] or '')
end

-- Event kinds of the live feed (the values of spendgate.v1.EventKind).
local EVENT_DECISION, EVENT_CAPTURE, EVENT_VOID, EVENT_ALERT, EVENT_FREEZE, EVENT_UNFREEZE, EVENT_CONFIG =
  1, 2, 3, 4, 5, 6, 7

-- Append an event to an account's live feed, capped at about length_max entries (the feed is for watching,
-- not for keeping: the ledger and the audit log keep what must last).
local function event_append(stream_key, length_max, now_ms, kind, node_id, chain, amount, ...)
  return redis.call('XADD', stream_key, 'MAXLEN', '~', length_max, '*', 'k', kind, 'at', now_ms,
    'node', node_id, 'chain', chain, 'amt', amount, ...)
end

-- The utilization thresholds that raise an alert, as numbers, from their comma-separated text (e.g. 50,80,100);
-- an entry that is not a number is left out.
local function alert_thresholds(text)
  local out = {}
  local texts = split(text, ',')
  for i = 1, #texts do
    local percent = tonumber(texts[i])
    if percent then out[#out + 1] = percent end
  end
  return out
end

-- Raise one alert per utilization threshold (percents: see alert_thresholds) that window `code` (1 day, 2 week,
-- 3 month, 4 total) of node `node_id` crosses, once per window id: the node remembers the highest threshold
-- it alerted in field al:<w> as "<window id>|<percent>" (stored: its value as read, parsed only when a
-- threshold is crossed, which few calls do). Returns the field's new value when it changes, for the caller to
-- write, else nil.
local function alert_crossings(stream_key, length_max, node_id, code, wid, limit, before, after, now_ms, percents,
    stored)
  if limit <= 0 then return nil end
  local alerted, highest
  for i = 1, #percents do
    local percent = percents[i]
    if after * 100 >= percent * limit and before * 100 < percent * limit then
      if not alerted then
        alerted = 0
        if stored then
          local parts = split(stored, '|')
          if parts[1] == wid then alerted = tonumber(parts[2]) or 0 end
        end
        highest = alerted
      end
      if percent > alerted then
        event_append(stream_key, length_max, now_ms, EVENT_ALERT, node_id, node_id, int_str(after),
          'win', code, 'pct', int_str(percent), 'lim', int_str(limit))
        if percent > highest then highest = percent end
      end
    end
  end
  if alerted and highest > alerted then
    return wid .. '|' .. int_str(highest)
  end
  return nil
end

-- Freeze a node with a reason and tell the live feed.
local function freeze_node(stream_key, length_max, node_key, node_id, reason, now_ms)
  redis.call('HSET', node_key, 'frz', reason)
  event_append(stream_key, length_max, now_ms, EVENT_FREEZE, node_id, node_id, '0', 'msg', reason)
end

-- The spend-rate breaker: count an approved amount in the node's per-minute ring, then compare the spend of
-- the recent minutes with the trailing average for as many minutes. The ring has one slot per minute
-- (fields rb:<slot> amount, rm:<slot> the minute it holds), so a node keeps a bounded number of fields.
local function breaker_step(stream_key, length_max, node, minute, amount_str, now_ms)
  local cfg = split(node.breaker, ',')
  local multiplier, recent_n, trailing_n = tonumber(cfg[1]), tonumber(cfg[2]), tonumber(cfg[3])
  local min_spend = tonumber(cfg[4]) or 0
  if not (multiplier and recent_n and trailing_n) or recent_n < 1 or trailing_n < 1 then return end
  local size = recent_n + trailing_n
  local slot = minute % size
  if redis.call('HGET', node.key, 'rm:' .. slot) ~= int_str(minute) then
    redis.call('HSET', node.key, 'rm:' .. slot, int_str(minute), 'rb:' .. slot, '0')
  end
  redis.call('HINCRBY', node.key, 'rb:' .. slot, amount_str)
  local fields = {}
  for s = 0, size - 1 do
    fields[#fields + 1] = 'rm:' .. s
    fields[#fields + 1] = 'rb:' .. s
  end
  local ring = redis.call('HMGET', node.key, unpack(fields))
  local recent, trailing, oldest_back = 0, 0, 0
  for back = 0, size - 1 do
    local m = minute - back
    local s = m % size
    if ring[2 * s + 1] == int_str(m) then
      oldest_back = back
      if back < recent_n then
        recent = recent + num(ring[2 * s + 2])
      else
        trailing = trailing + num(ring[2 * s + 2])
      end
    end
  end
  -- Without trailing spend there is no baseline to compare with; a node needs some history to trip. The
  -- average is taken over the trailing minutes the ring has seen: a node that started spending (or came back
  -- from a pause) a few minutes ago has no history before that, which is not the same as spending nothing.
  if trailing == 0 then return end
  local observed = math.min(trailing_n, oldest_back - recent_n + 1)
  local average = trailing / observed * recent_n
  if recent >= min_spend and recent > multiplier * average then
    local reason = string.format('breaker: spent %s micros in %d min, over %s x the trailing average of %s',
      int_str(recent), recent_n, tostring(multiplier), int_str(math.floor(average)))
    freeze_node(stream_key, length_max, node.key, node.id, reason, now_ms)
  end
end

-- The money a node carries now: everything it holds (the total window's held, which never rolls) and the
-- largest spend of its open day, week and month windows. Used to refuse unsafe moves and removals.
local function carried_money(node_key, account_key, day, week, month)
  local wins = effective_windows(account_key, {d = day, w = week, m = month})
  local v = redis.call('HMGET', node_key, 'd:id', 'd:s', 'w:id', 'w:s', 'm:id', 'm:s', 't:h')
  local spent = 0
  local names = {'d', 'w', 'm'}
  for i = 1, 3 do
    if v[2 * i - 1] == wins[names[i]] then
      spent = math.max(spent, num(v[2 * i]))
    end
  end
  return num(v[7]), spent
end

-- Check the caller's token inside the same atomic step as the decision, so a revoked token fails on the very
-- next call on every replica and no state is touched before the check. mode: '' (auth off), '*' (the
-- deployment's root token, checked by the server), or a token hash, whose account-tagged record is token_key.
-- An agent token may act only on its own wallet; a reader token may not spend. Returns nil when allowed,
-- else an error reply.
local function check_token(mode, token_key, wallet_id)
  if mode == '' or mode == '*' then
    return nil
  end
  local t = redis.call('HMGET', token_key, 'role', 'scope')
  if not t[1] then
    return {'ERR', 'UNAUTHENTICATED', ''}
  end
  if t[1] == 'agent' and t[2] ~= wallet_id then
    return {'ERR', 'PERMISSION_DENIED', 'this agent token is for wallet ' .. tostring(t[2])}
  end
  if t[1] == 'reader' then
    return {'ERR', 'PERMISSION_DENIED', 'a read-only token cannot spend'}
  end
  return nil
end

-- Walk a wallet's chain up its parents' keys, from the wallet's key: returns {ids = ..., keys = ..., topo,
-- cur, tz} (ids and keys wallet first, account last; topo, cur and tz the account's), or nil and an error
-- reply: NOT_FOUND, or NOT_A_WALLET with the node's kind. Every parent key carries the wallet's hash tag (the
-- account's), so on a cluster the walk stays on the wallet's shard. A tree deeper than 32 levels is refused
-- when a plan is applied; the bound also stops a corrupted cycle.
local function walk_chain(key)
  local kind = redis.call('HGET', key, 'kind')
  if not kind then
    return nil, {'ERR', 'NOT_FOUND', ''}
  end
  if kind ~= 'wallet' then
    return nil, {'ERR', 'NOT_A_WALLET', kind}
  end
  local ids, keys = {}, {}
  for _ = 1, 32 do
    local v = redis.call('HMGET', key, 'id', 'kind', 'pkey', 'topo', 'cur', 'tz')
    ids[#ids + 1] = v[1]
    keys[#keys + 1] = key
    if v[2] == 'account' then
      return {ids = ids, keys = keys, topo = v[4], cur = v[5], tz = v[6]}
    end
    if not v[3] then
      return nil, {'ERR', 'NOT_FOUND', ''}
    end
    key = v[3]
  end
  return nil, {'ERR', 'NOT_FOUND', 'cycle'}
end
