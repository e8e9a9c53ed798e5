-- freeze.lua: freeze or unfreeze a node; optionally void every open hold under it in the same step.
--
-- KEYS[1]  the node's hash
-- KEYS[2]  the account's holds zset
-- KEYS[3]  the account's event stream
-- ARGV[1]  node_id
-- ARGV[2]  reason            why (non-empty freezes; empty unfreezes)
-- ARGV[3]  void_holds        '1' to void the open holds whose chain contains the node
-- ARGV[4]  now_ms            the caller's clock, milliseconds since the Unix epoch
-- ARGV[5]  retention_ms      how long a resolved hold record is kept
-- ARGV[6]  events_length_max the event stream's approximate cap
--
-- Returns {'OK', was_frozen (0/1), holds_voided, released_micros} or {'ERR', 'NOT_FOUND', ''}.
--
-- Invariant: authorize.lua reads the freeze flag on every call, so the very next authorization on any
-- replica sees it; voided holds give their money back to every level exactly as a Void would.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'ERR', 'NOT_FOUND', ''}
end
local before = redis.call('HGET', KEYS[1], 'frz')
local was_frozen = (before and before ~= '') and 1 or 0
local voided, released = 0, 0
if ARGV[2] ~= '' then
  freeze_node(KEYS[3], ARGV[6], KEYS[1], ARGV[1], ARGV[2], ARGV[4])
  if ARGV[3] == '1' then
    for _, hold_key in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
      local h = redis.call('HMGET', hold_key, 'st', 'ids', 'wal', 'amt')
      if h[1] == tostring(HELD) then
        for _, id in ipairs(split(h[2], ',')) do
          if id == ARGV[1] then
            release_hold(hold_key, KEYS[2], VOIDED, ARGV[5])
            event_append(KEYS[3], ARGV[6], ARGV[4], EVENT_VOID, h[3], h[2], h[4], 'msg', 'voided by freeze')
            voided = voided + 1
            released = released + num(h[4])
            break
          end
        end
      end
    end
  end
else
  redis.call('HSET', KEYS[1], 'frz', '')
  event_append(KEYS[3], ARGV[6], ARGV[4], EVENT_UNFREEZE, ARGV[1], ARGV[1], '0')
end
return {'OK', int_str(was_frozen), int_str(voided), int_str(released)}
