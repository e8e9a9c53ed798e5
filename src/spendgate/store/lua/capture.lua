-- capture.lua: settle a hold, fully or partially; the uncaptured rest goes back to every level.
--
-- KEYS[1]  the account's holds zset
-- KEYS[2]  the account's ledger outbox stream
-- KEYS[3]  the hold
-- KEYS[4]  the account's event stream
-- KEYS[5]  the caller's token record in this account (see check_token)
-- ARGV[1]  now_ms            the caller's clock, milliseconds since the Unix epoch
-- ARGV[2]  amount_micros     positive integer string, at most 1e15
-- ARGV[3]  idempotency_key   the client's key for this capture
-- ARGV[4]  retention_ms      how long the resolved hold record is kept
-- ARGV[5]  authorization_id  the hold's id, written to the ledger as the transaction id
-- ARGV[6]  events_length_max the event stream's approximate cap
-- ARGV[7]  token_mode        '' (auth off), '*' (root token) or the caller's token hash
--
-- Returns {'OK', captured_micros, released_micros, replayed}
--      or {'ERR', code, detail} with code UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, ALREADY_CAPTURED,
--         VOIDED, EXPIRED or ABOVE_HOLD
--         (detail: the held amount); an error changes nothing, except that a hold found expired is
--         released exactly as the sweeper would have released it.
--
-- Invariant: a hold is captured or voided once. Its held money leaves every window it was counted in, the
-- captured part is added to those windows' spent, and the settlement is appended to the outbox in the same
-- step, so a settled transaction is never counted without being ledgered, nor the reverse.

local hold_key = KEYS[3]
local h = redis.call('HMGET', hold_key, 'st', 'amt', 'exp', 'cap', 'ck', 'keys', 'win', 'ids', 'wal')
-- The caller's token is checked before anything else; a valid token that may not act on this hold learns
-- nothing more than that.
local refused = check_token(ARGV[7], KEYS[5], h[9] or '')
if refused and refused[2] == 'UNAUTHENTICATED' then
  return refused
end
if not h[1] then
  return {'ERR', 'NOT_FOUND', ''}
end
if refused then
  return refused
end
local state = tonumber(h[1])
if state == CAPTURED then
  if h[5] == ARGV[3] and h[4] == ARGV[2] then
    return {'OK', h[4], int_str(num(h[2]) - num(h[4])), '1'}
  end
  return {'ERR', 'ALREADY_CAPTURED', h[4]}
end
if state == VOIDED then
  return {'ERR', 'VOIDED', h[2]}
end
if state == EXPIRED then
  return {'ERR', 'EXPIRED', h[2]}
end
if tonumber(h[3]) <= tonumber(ARGV[1]) then
  release_hold(hold_key, KEYS[1], EXPIRED, ARGV[4])
  return {'ERR', 'EXPIRED', h[2]}
end
local held = tonumber(h[2])
local amount = tonumber(ARGV[2])
if amount > held then
  return {'ERR', 'ABOVE_HOLD', h[2]}
end

local keys = split(h[6], ',')
local wins = split(h[7], ',')
local ids = {d = wins[1], w = wins[2], m = wins[3], t = 'all'}
for i = 1, #keys do
  for _, w in ipairs(WINDOWS) do
    if redis.call('HGET', keys[i], w .. ':id') == ids[w] then
      redis.call('HINCRBY', keys[i], w .. ':h', '-' .. h[2])
      redis.call('HINCRBY', keys[i], w .. ':s', ARGV[2])
    end
  end
end
redis.call('HSET', hold_key, 'st', CAPTURED, 'cap', ARGV[2], 'ck', ARGV[3])
redis.call('ZREM', KEYS[1], hold_key)
hold_count_down(keys[1])
redis.call('PEXPIRE', hold_key, ARGV[4])
outbox_append(KEYS[2], hold_key, ARGV[5], ARGV[2], ARGV[1])
event_append(KEYS[4], ARGV[6], ARGV[1], EVENT_CAPTURE, h[9], h[8], ARGV[2], 'auth', ARGV[5])
return {'OK', ARGV[2], int_str(held - amount), '0'}
