-- Reserve a nick in a room for one connection, unless a live connection of another user holds
-- it. The same user may take its nick over (a reconnect before the old connection is gone).
--
-- KEYS[1] nicks hash of the room  KEYS[2] nodes zset
-- ARGV[1] nick key (lowercase)  ARGV[2] 'node_id conn_id user_id' of the claimant
-- ARGV[3] now (unix ms)
-- Returns 1 when the claimant holds the nick, 0 when it is taken.
local holder = redis.call('HGET', KEYS[1], ARGV[1])
if holder and holder ~= ARGV[2] then
  local owner, user = string.match(holder, '^(%S+) %S+ (.*)$')
  local claimant = string.match(ARGV[2], '^%S+ %S+ (.*)$')
  if user ~= claimant then
    local lease = redis.call('ZSCORE', KEYS[2], owner)
    if lease and tonumber(lease) >= tonumber(ARGV[3]) then return 0 end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
