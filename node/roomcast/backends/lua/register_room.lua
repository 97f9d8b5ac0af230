-- Put a room in a node's rooms set (which a reaper of that node walks) and give the set the
-- room keys' TTL, in one step: presence_redis._register_room, before the node's first entry
-- of the room is written. Its own call: on a Redis Cluster the set is not in the room's slot.
--
-- KEYS[1]  the node's rooms set
-- ARGV[1]  the room
-- ARGV[2]  the TTL in milliseconds
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
