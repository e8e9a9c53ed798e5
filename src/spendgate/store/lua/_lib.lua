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
local WINDOW_CODE = {d = 1, w = 2, m = 3, t = 4}
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

-- The window ids in force for an account: the caller's (from its clock) unless the account already moved
-- to a later window (a replica whose clock is slightly behind). The account node is touched by every
-- authorization, so its ids are the latest any node of the account has; using them keeps all nodes of a
-- chain in the same windows, and a window never goes back.
local function effective_windows(account_key, requested)
  local stored = redis.call('HMGET', account_key, 'd:id', 'w:id', 'm:id')
  local out = {t = 'all'}
  local names = {'d', 'w', 'm'}
  for i = 1, 3 do
    local name = names[i]
    local current = stored[i]
    if current and current > requested[name] then
      out[name] = current
    else
      out[name] = requested[name]
    end
  end
  return out
end

-- Add delta (an integer string, may be negative) to field kind ('s' or 'h') of window w on a node, counted
-- in window id wid. A node whose window is older than wid is rolled forward (its counters start at zero);
-- a node already in a later window ignores the change, since money of a closed window no longer limits.
local function window_add(key, w, wid, kind, delta)
  local current = redis.call('HGET', key, w .. ':id')
  if current == wid then
    redis.call('HINCRBY', key, w .. ':' .. kind, delta)
  elseif (not current) or current < wid then
    redis.call('HSET', key, w .. ':id', wid, w .. ':s', '0', w .. ':h', '0')
    redis.call('HINCRBY', key, w .. ':' .. kind, delta)
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
  return amount
end

-- Release up to `count_max` holds of an account that expired at or before now_ms. Returns how many.
local function expire_due(holds_key, now_ms, count_max, retention_ms)
  local due = redis.call('ZRANGEBYSCORE', holds_key, '-inf', now_ms, 'LIMIT', 0, count_max)
  for _, hold_key in ipairs(due) do
    if redis.call('HGET', hold_key, 'st') == tostring(HELD) then
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
local function outbox_append(outbox_key, hold_key, txn_id, captured, now_ms)
  local h = redis.call('HMGET', hold_key, 'ids', 'wal', 'amt', 'cur', 'svc', 'md', 'at', 'win', 'ik', 'ck')
  local wins = split(h[8], ',')
  local ids = split(h[1], ',')
  return redis.call('XADD', outbox_key, '*',
    'txn_id', txn_id,
    'account_id', ids[#ids],
    'wallet_id', h[2],
    'chain', h[1],
    'amount_micros', captured,
    'authorized_micros', h[3],
    'currency', h[4],
    'service', h[5],
    'metadata', h[6],
    'authorized_at_ms', h[7],
    'captured_at_ms', now_ms,
    'day', wins[1],
    'week', wins[2],
    'month', wins[3],
    'idempotency_key', h[9],
    'capture_idempotency_key', h[10] or '')
end
