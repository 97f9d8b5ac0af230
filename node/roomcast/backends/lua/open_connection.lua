-- Count one connection towards its user's open connections in the cluster, unless the user
-- already has the limit of live ones. The liveness of nodes lives in the cluster-wide nodes
-- zset, another slot, so the caller reads it first and passes the nodes whose connections
-- count; this script drops the entries of every other node (dead, reaped: nothing else removes
-- them), counts the rest and records the connection if the user is below the limit. One key,
-- so one slot. The hash gets its TTL on every call, so a user who stops connecting leaves
-- nothing behind.
--
-- KEYS[1] the user's connections hash (conn_id -> node_id)
-- ARGV[1] conn_id  ARGV[2] this node's id  ARGV[3] the limit (>= 1)
-- ARGV[4] TTL of the hash (ms)
-- ARGV[5..] the node ids whose connections count (this node among them)
-- Returns 1 when the connection counts now (it did already, or the user was below the limit),
-- 0 when the user has the limit of live connections (nothing is recorded then).
local counted = {}
for i = 5, #ARGV do counted[ARGV[i]] = true end
local entries = redis.call('HGETALL', KEYS[1])
local live = 0
local present = false
for i = 1, #entries, 2 do
  if not counted[entries[i + 1]] then
    redis.call('HDEL', KEYS[1], entries[i])
  elseif entries[i] == ARGV[1] then
    present = true
  else
    live = live + 1
  end
end
local opened = 0
if present or live < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  opened = 1
end
if live > 0 or opened == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return opened
