-- Drop every presence entry of one node in one room: a dead node (lease expired) or this node
-- on a clean shutdown. The caller claims the node (lua/claim_due.lua), reads the node's rooms
-- set and runs this once per room; each run touches only that room's keys (one slot).
-- Idempotent: a second run for the same (room, node) finds no entries and changes nothing, so
-- a reap taken over from a reaper that died half-way counts nobody twice.
--
-- KEYS[1] presence hash of (room, node)   KEYS[2] presence nodes set of the room
-- KEYS[3] users hash of the room          KEYS[4] nicks hash of the room
-- KEYS[5] pending leaves zset of the room KEYS[6] leave names hash of the room
-- ARGV[1] node_id  ARGV[2] leave deadline (unix ms)
-- ARGV[3] TTL of the room's pending leave keys (ms)
-- Returns {dropped, earliest}: the number of connections dropped and the room's earliest
-- pending leave deadline or '' (for the leave-rooms index).
local dropped = 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local conn, member = entries[i], cjson.decode(entries[i + 1])
  dropped = dropped + 1
  if member.nick then
    local key = string.lower(member.nick)
    local holder = redis.call('HGET', KEYS[4], key)
    local mine = ARGV[1] .. ' ' .. conn .. ' '
    if holder and string.sub(holder, 1, #mine) == mine then
      redis.call('HDEL', KEYS[4], key)
    end
  end
  local count = redis.call('HINCRBY', KEYS[3], member.user_id, -1)
  if count <= 0 then
    redis.call('HDEL', KEYS[3], member.user_id)
    redis.call('ZADD', KEYS[5], ARGV[2], member.user_id)
    redis.call('HSET', KEYS[6], member.user_id, member.username)
    redis.call('PEXPIRE', KEYS[5], ARGV[3])
    redis.call('PEXPIRE', KEYS[6], ARGV[3])
  end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
local first = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
return {dropped, first[2] or ''}
