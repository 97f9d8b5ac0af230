-- Claim the user_left decisions whose grace window has passed; each is claimed by one node.
--
-- KEYS[1] pending leaves zset  KEYS[2] leave names hash
-- ARGV[1] now (unix ms)  ARGV[2] key prefix  ARGV[3] most to claim
-- Returns a flat list: room, user_id, username, ... of users to announce as gone.
local out = {}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, leave in ipairs(due) do
  redis.call('ZREM', KEYS[1], leave)
  local username = redis.call('HGET', KEYS[2], leave) or ''
  redis.call('HDEL', KEYS[2], leave)
  local sep = string.find(leave, '\0', 1, true)
  local room, user = string.sub(leave, 1, sep - 1), string.sub(leave, sep + 1)
  -- Still gone? (A user who came back on another path has a count again.)
  if not redis.call('HGET', ARGV[2] .. ':users:{' .. room .. '}', user) then
    out[#out + 1] = room
    out[#out + 1] = user
    out[#out + 1] = username
  end
end
return out
