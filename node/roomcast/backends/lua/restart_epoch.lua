-- Start a new epoch for a room whose history went back: its last offset is below what a node
-- has already delivered in the same epoch (a Redis failover lost the newest writes, and
-- publish.lua would hand out those offsets again for other messages), or it holds another
-- message where the node delivered one (a deposed master ran a late publish). Compare-and-set: of
-- several nodes that find it, only the first starts the epoch; the others get it.
--
-- KEYS[1]  meta hash of the room   (fields: offset, epoch)
-- KEYS[2]  history stream of the room
-- ARGV[1]  the epoch the node delivered in
-- ARGV[2]  the offset the node delivered up to in it
-- ARGV[3]  the new epoch, if one is started
-- ARGV[4]  1: start it even if the offset is not below ARGV[2] (history holds another message
--          where the node delivered one), 0: only then
-- Returns the room's epoch after the call.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
if epoch == ARGV[1] and (ARGV[4] == '1' or offset < tonumber(ARGV[2])) then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[3], 'offset', 0)
  redis.call('DEL', KEYS[2])
  return ARGV[3]
end
return epoch or ''
