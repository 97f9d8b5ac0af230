-- Record one connection's presence in a room; say whether its user is newly present.
--
-- KEYS[1] presence hash of (room, this node)   KEYS[2] presence nodes set of the room
-- KEYS[3] users hash of the room               KEYS[4] pending leaves zset
-- KEYS[5] leave names hash                     KEYS[6] this node's rooms set
-- KEYS[7] rooms set
-- ARGV[1] node_id  ARGV[2] conn_id  ARGV[3] member JSON  ARGV[4] user_id  ARGV[5] room
-- Returns 1 when the user was not present (announce user_joined), else 0.
if redis.call('HSETNX', KEYS[1], ARGV[2], ARGV[3]) == 0 then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[6], ARGV[5])
redis.call('SADD', KEYS[7], ARGV[5])
local count = redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
local leave = ARGV[5] .. '\0' .. ARGV[4]
if redis.call('ZREM', KEYS[4], leave) == 1 then
  -- Back within the grace window: no user_left was sent, so no user_joined either.
  redis.call('HDEL', KEYS[5], leave)
  return 0
end
if count == 1 then return 1 end
return 0
