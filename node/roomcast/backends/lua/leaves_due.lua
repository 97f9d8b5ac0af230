-- Take the room's user_left decisions whose grace window has passed. Each is popped here, in
-- one atomic step, so that it is announced once even if two nodes look at the room at once.
-- Touches only the room's keys (one slot); the caller has claimed the room in the leave-rooms
-- index (lua/claim_due.lua) and settles it afterwards with the earliest deadline left
-- (lua/leave_index.lua).
--
-- KEYS[1] pending leaves zset of the room  KEYS[2] leave names hash of the room
-- KEYS[3] users hash of the room
-- ARGV[1] now (unix ms)  ARGV[2] most to take
-- Returns {earliest, user_id, username, ...}: the earliest deadline still pending or '', then
-- the users to announce as gone, in deadline order.
local out = {''}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, user in ipairs(due) do
  redis.call('ZREM', KEYS[1], user)
  local username = redis.call('HGET', KEYS[2], user) or ''
  redis.call('HDEL', KEYS[2], user)
  -- Still gone? (A user who came back on another path has a count again.)
  if redis.call('HEXISTS', KEYS[3], user) == 0 then
    out[#out + 1] = user
    out[#out + 1] = username
  end
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then out[1] = first[2] end
return out
