-- koogate: events left the outbox, delivered or dead-lettered (a batch of one shard).
-- KEYS[1] outbox stream  KEYS[2] attempts hash  KEYS[3] dead-letter hash
-- KEYS[3 + i] the instance record of the i-th event
-- ARGV[1] group, then four per event: event id, seq, stream entry id,
-- dead letter JSON ('' when delivered)
-- Per event: the instance's delivered_seq advances (never goes back) and a
-- dead letter is kept; then one HDEL, XACK and XDEL for the whole batch.
local ids, cursors = {}, {}
local n = (#ARGV - 1) / 4
for i = 1, n do
  local a = 2 + (i - 1) * 4
  local key = KEYS[3 + i]
  local seq = tonumber(ARGV[a + 1])
  local done = tonumber(redis.call('HGET', key, 'delivered_seq') or '0')
  if seq > done then
    redis.call('HSET', key, 'delivered_seq', seq)
  end
  if ARGV[a + 3] ~= '' then
    redis.call('HSET', KEYS[3], ARGV[a], ARGV[a + 3])
  end
  ids[i] = ARGV[a]
  cursors[i] = ARGV[a + 2]
end
if n > 0 then
  redis.call('HDEL', KEYS[2], unpack(ids))
  redis.call('XACK', KEYS[1], ARGV[1], unpack(cursors))
  redis.call('XDEL', KEYS[1], unpack(cursors))
end
return n
