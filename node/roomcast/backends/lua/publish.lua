-- Assign the next offsets of a room, store the messages in its history and publish them,
-- atomically, so that history order and live order can never disagree. One call publishes one
-- message or several consecutive ones of the same room (a publish queue's batch merges them:
-- broker_redis._PublishQueue): one script run for all of them. With an
-- idempotency key (one message only), a retry of a publish made within the window publishes and
-- stores nothing and returns the first result.
--
-- KEYS[1]  meta hash of the room   (fields: offset, epoch)
-- KEYS[2]  history stream of the room
-- KEYS[3]  optional: idempotency key of this publish (string "offset epoch"), in the room's slot
-- ARGV[1]  pub/sub channel of the room
-- ARGV[2]  history size (0 = keep no history)
-- ARGV[3]  history TTL in milliseconds (0 = no expiry)
-- ARGV[4]  epoch to use if the room has none yet (its history is new or was lost)
-- ARGV[5]  PUBLISH, or SPUBLISH (--redis-cluster: ARGV[1] is the partition's sharded channel,
--          in the same slot as KEYS)
-- ARGV[6]  with KEYS[3]: idempotency window in milliseconds (> 0); else ignored
-- ARGV[7]  n, the number of messages (1 with KEYS[3])
-- then, per message i (1..n), three arguments from ARGV[8 + 3 * (i - 1)]:
--          its envelope without the closing brace (see protocol.message_prefix), its origin
--          (conn_id; with --redis-cluster "<conn_id> <room>", the room named in the frame), and
--          its publish timestamp in unix microseconds (for fan-out latency)
-- Returns {offset, epoch, duplicate}: offset is the first message's (message i has offset + i -
-- 1); duplicate is 1 when KEYS[3] held a result (nothing was published), else 0.
--
-- Each message is its own pub/sub message, "<offset> <epoch> <ts_us> <origin>\n<envelope>", as
-- when they were published one call each: a node of any version reads them.
if KEYS[3] and ARGV[7] ~= '1' then
  return redis.error_reply('ERR an idempotent publish is one message')
end
if KEYS[3] then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    -- Returned as stored even if the room's epoch changed since (its history was lost or
    -- expired): the message was published then, in that epoch; publishing it again in the new
    -- one would deliver it twice to whoever received the first.
    local space = string.find(seen, ' ', 1, true)
    return {tonumber(string.sub(seen, 1, space - 1)), string.sub(seen, space + 1), 1}
  end
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[4]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
  redis.call('DEL', KEYS[2])  -- a leftover stream of a lost epoch must not block new IDs
end
local n = tonumber(ARGV[7])
local last = redis.call('HINCRBY', KEYS[1], 'offset', n)
local first = last - n + 1
local size = tonumber(ARGV[2])
local tail = ',"epoch":"' .. epoch .. '"}'
for i = 1, n do
  local base = 8 + 3 * (i - 1)
  local offset = first + i - 1
  local payload = ARGV[base] .. ',"offset":' .. offset .. tail
  if size > 0 then
    redis.call('XADD', KEYS[2], 'MAXLEN', size, offset .. '-0', 'm', payload)
  end
  redis.call(ARGV[5], ARGV[1],
    offset .. ' ' .. epoch .. ' ' .. ARGV[base + 2] .. ' ' .. ARGV[base + 1] .. '\n' .. payload)
end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  if size > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
if KEYS[3] then
  redis.call('SET', KEYS[3], first .. ' ' .. epoch, 'PX', ARGV[6])
end
return {first, epoch, 0}
