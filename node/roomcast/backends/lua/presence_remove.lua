-- Drop one connection's presence; when its user has no connection left in the room, schedule
-- the user_left decision for after the grace window. Also releases the connection's nick.
--
-- KEYS[1] presence hash of (room, this node)   KEYS[2] presence nodes set of the room
-- KEYS[3] users hash of the room               KEYS[4] pending leaves zset
-- KEYS[5] leave names hash                     KEYS[6] this node's rooms set
-- KEYS[7] rooms set                            KEYS[8] nicks hash of the room
-- ARGV[1] node_id  ARGV[2] conn_id  ARGV[3] user_id  ARGV[4] room  ARGV[5] username
-- ARGV[6] leave deadline (unix ms)  ARGV[7] nick key or ''
local holder = ARGV[7] ~= '' and redis.call('HGET', KEYS[8], ARGV[7])
local mine = ARGV[1] .. ' ' .. ARGV[2] .. ' '
if holder and string.sub(holder, 1, #mine) == mine then
  redis.call('HDEL', KEYS[8], ARGV[7])
end
if redis.call('HDEL', KEYS[1], ARGV[2]) == 0 then return 0 end
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('SREM', KEYS[6], ARGV[4])
end
local count = redis.call('HINCRBY', KEYS[3], ARGV[3], -1)
if count <= 0 then
  redis.call('HDEL', KEYS[3], ARGV[3])
  if redis.call('HLEN', KEYS[3]) == 0 then redis.call('SREM', KEYS[7], ARGV[4]) end
  local leave = ARGV[4] .. '\0' .. ARGV[3]
  redis.call('ZADD', KEYS[4], ARGV[6], leave)
  redis.call('HSET', KEYS[5], leave, ARGV[5])
end
return 1
