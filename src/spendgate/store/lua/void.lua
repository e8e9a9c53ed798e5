-- void.lua: release a hold without spending any of it.
--
-- KEYS[1]  the account's holds zset
-- KEYS[2]  the hold
-- KEYS[3]  the account's event stream
-- KEYS[4]  the caller's token record in this account (see check_token)
-- ARGV[1]  now_ms        the caller's clock, milliseconds since the Unix epoch
-- ARGV[2]  retention_ms  how long the resolved hold record is kept
-- ARGV[3]  authorization_id    the hold's id, for the event
-- ARGV[4]  events_length_max   the event stream's approximate cap
-- ARGV[5]  token_mode          '' (auth off), '*' (root token) or the caller's token hash
--
-- Returns {'OK', released_micros, replayed}
--      or {'ERR', code, detail} with code UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, ALREADY_CAPTURED or
--         EXPIRED; an error changes nothing,
--         except that a hold found expired is released exactly as the sweeper would have released it.
--
-- Invariant: a hold is captured or voided once; voiding a voided hold answers as the first void did.

local hold_key = KEYS[2]
local h = redis.call('HMGET', hold_key, 'st', 'amt', 'exp', 'ids', 'wal')
local refused = check_token(ARGV[5], KEYS[4], h[5] or '')
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
if state == VOIDED then
  return {'OK', h[2], '1'}
end
if state == CAPTURED then
  return {'ERR', 'ALREADY_CAPTURED', h[2]}
end
if state == EXPIRED then
  return {'ERR', 'EXPIRED', h[2]}
end
if tonumber(h[3]) <= tonumber(ARGV[1]) then
  release_hold(hold_key, KEYS[1], EXPIRED, ARGV[2])
  return {'ERR', 'EXPIRED', h[2]}
end
release_hold(hold_key, KEYS[1], VOIDED, ARGV[2])
event_append(KEYS[3], ARGV[4], ARGV[1], EVENT_VOID, h[5], h[4], h[2], 'auth', ARGV[3])
return {'OK', h[2], '0'}
