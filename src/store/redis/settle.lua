-- koogate: events left the outbox, delivered or dead-lettered, in groups of
-- one shard each (on a standalone Redis one run takes every shard's group; on
-- a cluster, where a script's keys must share a slot, one group per run).
-- ARGV[1] consumer group  ARGV[2] retention (ms; 0 = keep none)
-- ARGV[3] cutoff (UNIX ms: older history is trimmed)
-- then per group: its number of events n, then seven per event: event id, seq,
-- stream entry id, dead letter JSON ('' when not dead), history JSON ('' when
-- not delivered now), delivered at (UNIX ms), '1' when the event has an
-- order index to write, else '0'.
-- KEYS, per group: outbox stream, attempts hash, dead-letter hash, history by
-- time (zset); then three per event: its instance record, its history key,
-- and its order index (the transition's order id when it is not the record's
-- purchase order, src/store/plan.rs `entry_indexed_order_id`; without one,
-- the slot repeats the record key, unused).
-- Per event: the instance's delivered_seq advances (never goes back), a dead
-- letter is kept, a delivered event not already past the cutoff is kept in the
-- history (expiring with the retention, indexed by time and that order id).
-- An instance's history needs no index: its event ids are evt_<instance>_<seq>,
-- seq 1 to the record's seq; a purchase order's events are its lines'
-- instances' events (src/store/redis/history.rs).
-- Per group: the time index trimmed of what is past the cutoff, then one HDEL,
-- XACK and XDEL for the whole group.
local retention = tonumber(ARGV[2])
local since = tonumber(ARGV[3])
local cutoff = '(' .. ARGV[3]
local a, k, total = 4, 1, 0
while a <= #ARGV do
  local n = tonumber(ARGV[a])
  a = a + 1
  local outbox, attempts, dlq, time = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  k = k + 4
  local ids, cursors = {}, {}
  for i = 1, n do
    local record = KEYS[k]
    local seq = tonumber(ARGV[a + 1])
    local done = tonumber(redis.call('HGET', record, 'delivered_seq') or '0')
    if seq > done then
      redis.call('HSET', record, 'delivered_seq', seq)
    end
    if ARGV[a + 3] ~= '' then
      redis.call('HSET', dlq, ARGV[a], ARGV[a + 3])
    end
    local at = ARGV[a + 5]
    if ARGV[a + 4] ~= '' and retention > 0 and tonumber(at) >= since then
      redis.call('SET', KEYS[k + 1], ARGV[a + 4], 'PX', retention)
      redis.call('ZADD', time, at, ARGV[a])
      -- An order's index is not trimmed here: it holds that order's few
      -- events, expires a retention after its newest, and reads skip members
      -- past the cutoff.
      if ARGV[a + 6] == '1' then
        redis.call('ZADD', KEYS[k + 2], at, ARGV[a])
        redis.call('PEXPIRE', KEYS[k + 2], retention)
      end
    end
    ids[i] = ARGV[a]
    cursors[i] = ARGV[a + 2]
    a = a + 7
    k = k + 3
  end
  redis.call('ZREMRANGEBYSCORE', time, '-inf', cutoff)
  if n > 0 then
    redis.call('HDEL', attempts, unpack(ids))
    redis.call('XACK', outbox, ARGV[1], unpack(cursors))
    redis.call('XDEL', outbox, unpack(cursors))
  end
  total = total + n
end
return total
