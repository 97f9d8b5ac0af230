-- Drop every presence entry of a node at once: a dead node (lease expired) or this node on a
-- clean shutdown. Claimed with ZREM so that exactly one node reaps a dead node.
--
-- KEYS[1] nodes zset  KEYS[2] the node's rooms set  KEYS[3] pending leaves zset
-- KEYS[4] leave names hash  KEYS[5] rooms set  KEYS[6] the node's info hash
-- ARGV[1] node_id  ARGV[2] key prefix  ARGV[3] leave deadline (unix ms)
-- ARGV[4] '1' to reap even if another node already claimed it (own clean shutdown)
-- Returns the number of connections dropped, or -1 when another node claimed the reap.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 and ARGV[4] ~= '1' then return -1 end
local prefix = ARGV[2]
local dropped = 0
for _, room in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local tag = '{' .. room .. '}'
  local pres = prefix .. ':pres:' .. tag .. ':' .. ARGV[1]
  local users = prefix .. ':users:' .. tag
  local nicks = prefix .. ':nicks:' .. tag
  local entries = redis.call('HGETALL', pres)
  for i = 1, #entries, 2 do
    local conn, member = entries[i], cjson.decode(entries[i + 1])
    dropped = dropped + 1
    if member.nick then
      local key = string.lower(member.nick)
      local holder = redis.call('HGET', nicks, key)
      local mine = ARGV[1] .. ' ' .. conn .. ' '
      if holder and string.sub(holder, 1, #mine) == mine then
        redis.call('HDEL', nicks, key)
      end
    end
    local count = redis.call('HINCRBY', users, member.user_id, -1)
    if count <= 0 then
      redis.call('HDEL', users, member.user_id)
      local leave = room .. '\0' .. member.user_id
      redis.call('ZADD', KEYS[3], ARGV[3], leave)
      redis.call('HSET', KEYS[4], leave, member.username)
    end
  end
  if redis.call('HLEN', users) == 0 then redis.call('SREM', KEYS[5], room) end
  redis.call('DEL', pres)
  redis.call('SREM', prefix .. ':presnodes:' .. tag, ARGV[1])
end
redis.call('DEL', KEYS[2], KEYS[6])
return dropped
