-- Assign the next offset of a room, store the message in its history and publish it, atomically,
-- so that history order and live order can never disagree. With an idempotency key, a retry of
-- a publish made within the window publishes and stores nothing and returns the first result.
--
-- KEYS[1]  meta hash of the room   (fields: offset, epoch)
-- KEYS[2]  history stream of the room
-- KEYS[3]  optional: idempotency key of this publish (string "offset epoch"), in the room's slot
-- ARGV[1]  pub/sub channel of the room
-- ARGV[2]  message envelope without its closing brace (see protocol.message_prefix)
-- ARGV[3]  origin conn_id (with --redis-cluster: "<conn_id> <room>", the room named in the frame)
-- ARGV[4]  history size (0 = keep no history)
-- ARGV[5]  history TTL in milliseconds (0 = no expiry)
-- ARGV[6]  epoch to use if the room has none yet (its history is new or was lost)
-- ARGV[7]  publish timestamp, unix microseconds (for fan-out latency)
-- ARGV[8]  PUBLISH, or SPUBLISH (--redis-cluster: ARGV[1] is the partition's sharded channel,
--          in the same slot as KEYS)
-- ARGV[9]  with KEYS[3]: idempotency window in milliseconds (> 0)
-- Returns {offset, epoch, duplicate}: duplicate is 1 when KEYS[3] held a result (nothing was
-- published), else 0.
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
  epoch = ARGV[6]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
  redis.call('DEL', KEYS[2])  -- a leftover stream of a lost epoch must not block new IDs
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local payload = ARGV[2] .. ',"offset":' .. offset .. ',"epoch":"' .. epoch .. '"}'
local size = tonumber(ARGV[4])
if size > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', size, offset .. '-0', 'm', payload)
end
local ttl = tonumber(ARGV[5])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  if size > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
redis.call(ARGV[8], ARGV[1], offset .. ' ' .. epoch .. ' ' .. ARGV[7] .. ' ' .. ARGV[3] .. '\n' .. payload)
if KEYS[3] then
  redis.call('SET', KEYS[3], offset .. ' ' .. epoch, 'PX', ARGV[9])
end
return {offset, epoch, 0}
