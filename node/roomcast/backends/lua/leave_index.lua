-- Keep the leave-rooms index right for one room: its score is when the room's pending leaves
-- next need a look, never later than the earliest of them. One key, so one slot.
--
-- Two kinds of caller:
-- * a remover or reaper that has just scheduled a leave in the room (ARGV[3] ''): lower the
--   score to the room's earliest deadline; a hold (negative score) is replaced, which tells
--   its holder that something was scheduled after it looked (below).
-- * the claimer settling the room after lua/leaves_due.lua (ARGV[3] its hold): if its hold is
--   still in place, nobody indexed the room since the claim, so every pending leave was seen by
--   leaves_due.lua: the room gets the earliest deadline left, or leaves the index when none is
--   left. If the hold is gone, a remover's (or a later claimer's) score is there: keep the
--   earlier of it and ours. Either way no pending leave is ever without an index entry.
--
-- KEYS[1] leave-rooms index zset
-- ARGV[1] room  ARGV[2] the room's earliest pending leave deadline (unix ms), or '' for none
-- ARGV[3] the hold this caller claimed the room with (lua/claim_due.lua), or ''
-- Returns 1.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if ARGV[3] ~= '' and score and tonumber(score) == tonumber(ARGV[3]) then
  if ARGV[2] == '' then
    redis.call('ZREM', KEYS[1], ARGV[1])
  else
    redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
  end
  return 1
end
if ARGV[2] ~= '' and (not score or tonumber(score) < 0 or tonumber(ARGV[2]) < tonumber(score)) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
end
return 1
