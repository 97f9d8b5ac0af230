-- Start a new epoch for a room whose history is no longer what a node delivered: it went back
-- below the node's position (a Redis failover lost the newest writes, and publish.lua hands
-- those offsets out again), or holds another message where the node delivered one (a deposed
-- master ran a late publish). Compare-and-set on the epoch alone: of several nodes that find
-- it, only the first starts the new epoch, the others get it; publishes made meanwhile in the
-- old epoch do not keep it alive (their offsets are the ambiguous ones).
--
-- KEYS[1]  meta hash of the room   (fields: offset, epoch)
-- KEYS[2]  history stream of the room
-- ARGV[1]  the epoch the node delivered in
-- ARGV[2]  the new epoch, if one is started
-- Returns the room's epoch after the call (never ARGV[1]).
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch or epoch == ARGV[1] then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[2], 'offset', 0)
  redis.call('DEL', KEYS[2])
  return ARGV[2]
end
return epoch
