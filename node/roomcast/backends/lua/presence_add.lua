-- Record one connection's presence in a room; say whether its user is newly present.
-- Touches only the room's keys (one slot); the caller adds the room to this node's rooms set
-- in a call of its own, before this one. The room's presence hash, nodes set and users hash get
-- a TTL on every call (the caller refreshes it while it has entries here), so that a cluster
-- that died as a whole leaves nothing behind for longer than that.
--
-- KEYS[1] presence hash of (room, this node)   KEYS[2] presence nodes set of the room
-- KEYS[3] users hash of the room               KEYS[4] pending leaves zset of the room
-- KEYS[5] leave names hash of the room
-- ARGV[1] node_id  ARGV[2] conn_id  ARGV[3] member JSON  ARGV[4] user_id
-- ARGV[5] TTL of the room's presence keys (ms)
-- Returns 1 when the user was not present (announce user_joined), else 0.
local fresh = 0
if redis.call('HSETNX', KEYS[1], ARGV[2], ARGV[3]) == 1 then
  redis.call('SADD', KEYS[2], ARGV[1])
  local count = redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
  if redis.call('ZREM', KEYS[4], ARGV[4]) == 1 then
    -- Back within the grace window: no user_left was sent, so no user_joined either. The room
    -- may stay in the leave-rooms index; whoever looks at it then finds nothing due.
    redis.call('HDEL', KEYS[5], ARGV[4])
  elseif count == 1 then
    fresh = 1
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
return fresh
