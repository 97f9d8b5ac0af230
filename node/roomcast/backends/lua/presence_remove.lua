-- Drop one connection's presence; when its user has no connection left in the room, schedule
-- the user_left decision for after the grace window. Also releases the connection's nick.
-- Touches only the room's keys (one slot): the caller then indexes the room's pending leaves
-- (lua/leave_index.lua) and, if this node has no entry left here, drops the room from this
-- node's rooms set, each in a call of its own.
--
-- KEYS[1] presence hash of (room, this node)   KEYS[2] presence nodes set of the room
-- KEYS[3] users hash of the room               KEYS[4] nicks hash of the room
-- KEYS[5] pending leaves zset of the room      KEYS[6] leave names hash of the room
-- ARGV[1] node_id  ARGV[2] conn_id  ARGV[3] user_id  ARGV[4] username
-- ARGV[5] leave deadline (unix ms)  ARGV[6] nick key or ''
-- ARGV[7] TTL of the room's pending leave keys (ms): they outlive no cluster by more than that
-- Returns {removed, empty, earliest}: removed 1 when the connection was present; empty 1 when
-- this node has no entry left in the room; earliest the room's earliest pending leave deadline
-- or '' (returned even when nothing was removed, so that a retried removal indexes it).
local holder = ARGV[6] ~= '' and redis.call('HGET', KEYS[4], ARGV[6])
local mine = ARGV[1] .. ' ' .. ARGV[2] .. ' '
if holder and string.sub(holder, 1, #mine) == mine then
  redis.call('HDEL', KEYS[4], ARGV[6])
end
local removed = redis.call('HDEL', KEYS[1], ARGV[2])
if removed == 1 then
  local count = redis.call('HINCRBY', KEYS[3], ARGV[3], -1)
  if count <= 0 then
    redis.call('HDEL', KEYS[3], ARGV[3])
    redis.call('ZADD', KEYS[5], ARGV[5], ARGV[3])
    redis.call('HSET', KEYS[6], ARGV[3], ARGV[4])
    redis.call('PEXPIRE', KEYS[5], ARGV[7])
    redis.call('PEXPIRE', KEYS[6], ARGV[7])
  end
end
local empty = 0
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[2], ARGV[1])
  empty = 1
end
local first = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
return {removed, empty, first[2] or ''}
