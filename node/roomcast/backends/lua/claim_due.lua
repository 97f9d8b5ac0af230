-- Claim one member of a schedule zset whose time has come, by replacing its score with a hold:
-- a negative score, minus the time until which the claim stands. One caller at a time then
-- does the work (reap a dead node; look at a room's due leaves), and if that caller dies half
-- way, another claims the member again once the hold has run out: nothing is left undone.
-- One key, so one slot: used on the nodes zset and on the leave-rooms index.
--
-- KEYS[1] the schedule zset (nodes, or leave rooms)
-- ARGV[1] member  ARGV[2] a positive score up to this is due (unix ms)
-- ARGV[3] now (unix ms): a hold that ended by then may be taken over
-- ARGV[4] the hold to set: minus the time (unix ms) until which this claim stands
-- Returns 1 when this call claimed the member, 0 when it is gone, not due or held by another.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
score = tonumber(score)
if score >= 0 then
  if score > tonumber(ARGV[2]) then return 0 end
elseif -score > tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
return 1
