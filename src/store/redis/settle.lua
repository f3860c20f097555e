-- koogate: events left the outbox, delivered or dead-lettered (a batch of one shard).
-- KEYS[1] outbox stream  KEYS[2] attempts hash  KEYS[3] dead-letter hash  KEYS[4] history by time (zset)
-- then five per event: its instance record, its history key, its instance's
-- history index, and two order history indexes (the transition's order id and
-- the purchase order id; a repeated key when there are fewer, written once)
-- ARGV[1] group  ARGV[2] retention (ms; 0 = keep none)  ARGV[3] cutoff (UNIX ms: older history is trimmed)
-- then six per event: event id, seq, stream entry id, dead letter JSON ('' when
-- not dead), history JSON ('' when not delivered now), delivered at (UNIX ms)
-- Per event: the instance's delivered_seq advances (never goes back), a dead
-- letter is kept, a delivered event not already past the cutoff is kept in the
-- history (expiring with the retention, indexed by time, instance and order;
-- the shard's time index trimmed of what is past the cutoff once per batch);
-- then one HDEL, XACK and XDEL for the whole batch.
local ids, cursors = {}, {}
local retention = tonumber(ARGV[2])
local since = tonumber(ARGV[3])
local cutoff = '(' .. ARGV[3]
local n = (#ARGV - 3) / 6
for i = 1, n do
  local a = 4 + (i - 1) * 6
  local k = 4 + (i - 1) * 5
  local key = KEYS[k + 1]
  local seq = tonumber(ARGV[a + 1])
  local done = tonumber(redis.call('HGET', key, 'delivered_seq') or '0')
  if seq > done then
    redis.call('HSET', key, 'delivered_seq', seq)
  end
  if ARGV[a + 3] ~= '' then
    redis.call('HSET', KEYS[3], ARGV[a], ARGV[a + 3])
  end
  local at = ARGV[a + 5]
  if ARGV[a + 4] ~= '' and retention > 0 and tonumber(at) >= since then
    redis.call('SET', KEYS[k + 2], ARGV[a + 4], 'PX', retention)
    redis.call('ZADD', KEYS[4], at, ARGV[a])
    -- An instance's or order's index is not trimmed here: it holds that one
    -- instance's (order's) few lifecycle events, expires a retention after
    -- its newest, and reads skip members past the cutoff. (The purchase order
    -- is most often the transition's own: its index is written once.)
    local last = (KEYS[k + 5] == KEYS[k + 4]) and 4 or 5
    for j = 3, last do
      redis.call('ZADD', KEYS[k + j], at, ARGV[a])
      redis.call('PEXPIRE', KEYS[k + j], retention)
    end
  end
  ids[i] = ARGV[a]
  cursors[i] = ARGV[a + 2]
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', cutoff)
if n > 0 then
  redis.call('HDEL', KEYS[2], unpack(ids))
  redis.call('XACK', KEYS[1], ARGV[1], unpack(cursors))
  redis.call('XDEL', KEYS[1], unpack(cursors))
end
return n
