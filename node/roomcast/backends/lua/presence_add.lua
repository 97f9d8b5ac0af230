-- Record one connection's presence in a room; say whether its user is newly present.
-- Touches only the room's keys (one slot); the caller adds the room to this node's rooms set
-- in a call of its own, before this one.
--
-- KEYS[1] presence hash of (room, this node)   KEYS[2] presence nodes set of the room
-- KEYS[3] users hash of the room               KEYS[4] pending leaves zset of the room
-- KEYS[5] leave names hash of the room
-- ARGV[1] node_id  ARGV[2] conn_id  ARGV[3] member JSON  ARGV[4] user_id
-- Returns 1 when the user was not present (announce user_joined), else 0.
if redis.call('HSETNX', KEYS[1], ARGV[2], ARGV[3]) == 0 then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
local count = redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
if redis.call('ZREM', KEYS[4], ARGV[4]) == 1 then
  -- Back within the grace window: no user_left was sent, so no user_joined either. The room
  -- may stay in the leave-rooms index; whoever looks at it then finds nothing due.
  redis.call('HDEL', KEYS[5], ARGV[4])
  return 0
end
if count == 1 then return 1 end
return 0
