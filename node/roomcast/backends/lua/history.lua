-- Read a room's position and the stored messages after an offset, in one consistent snapshot.
--
-- KEYS[1]  meta hash of the room
-- KEYS[2]  history stream of the room
-- ARGV[1]  first offset wanted (entries with offset >= it), or '-' for the newest ARGV[2]
-- ARGV[2]  most entries to return (0 = all)
-- ARGV[3]  epoch to give a room never published to (offset 0) that has none, so that a
--          position read now can be continued later
-- ARGV[4]  milliseconds such a room keeps its meta hash after this read (--idle-room-ttl)
-- Returns {offset, epoch, first stored offset or 0, payload...}.
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
local epoch = redis.call('HGET', KEYS[1], 'epoch') or ''
if offset == 0 then
  -- Never published to, or its history was lost: keep (or give) it an epoch for a while.
  if epoch == '' then
    epoch = ARGV[3]
    redis.call('HSET', KEYS[1], 'epoch', epoch)
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
local limit = tonumber(ARGV[2])
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local first_offset = 0
if #first > 0 then first_offset = tonumber(string.match(first[1][1], '^(%d+)')) end
local entries
if ARGV[1] == '-' then
  if limit > 0 then
    entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', limit)
  else
    entries = redis.call('XREVRANGE', KEYS[2], '+', '-')
  end
  local reversed = {}
  for i = #entries, 1, -1 do reversed[#reversed + 1] = entries[i] end
  entries = reversed
else
  if limit > 0 then
    entries = redis.call('XRANGE', KEYS[2], ARGV[1] .. '-0', '+', 'COUNT', limit)
  else
    entries = redis.call('XRANGE', KEYS[2], ARGV[1] .. '-0', '+')
  end
end
local out = {offset, epoch, first_offset}
for _, entry in ipairs(entries) do out[#out + 1] = entry[2][2] end
return out
