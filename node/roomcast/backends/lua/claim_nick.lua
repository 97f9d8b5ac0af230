-- Give a nick in a room to a connection if its holder is still the one the caller judged
-- replaceable: none, one with the claimant's owner, or a connection of a dead node. The
-- liveness of the holder's node lives in the cluster-wide nodes zset, another slot, so the
-- caller reads the holder and its lease first and this script only swaps if nothing changed
-- since (compare and set): a live other owner's nick is never taken, even if it was claimed in
-- between.
--
-- KEYS[1] nicks hash of the room
-- ARGV[1] nick key (lowercase)  ARGV[2] 'node_id conn_id owner' of the claimant (the owner
--         last: 'user:<user_id>', or 'conn:<conn_id>' for a connection without an identity)
-- ARGV[3] the holder the caller read ('' for none)
-- ARGV[4] TTL of the room's nicks hash (ms), refreshed by the nodes with entries in the room
-- Returns 1 when the claimant holds the nick now, 0 when the holder changed (read it again).
local holder = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if holder ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
