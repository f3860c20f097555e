-- koogate: an event left the outbox, delivered or dead-lettered.
-- KEYS[1] instance record  KEYS[2] outbox stream  KEYS[3] attempts hash  KEYS[4] dead-letter hash
-- ARGV[1] event id  ARGV[2] seq  ARGV[3] stream entry id  ARGV[4] group
-- ARGV[5] dead letter JSON ('' when delivered)
local seq = tonumber(ARGV[2])
local done = tonumber(redis.call('HGET', KEYS[1], 'delivered_seq') or '0')
if seq > done then
  redis.call('HSET', KEYS[1], 'delivered_seq', seq)
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[5])
end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('XACK', KEYS[2], ARGV[4], ARGV[3])
redis.call('XDEL', KEYS[2], ARGV[3])
return 1
