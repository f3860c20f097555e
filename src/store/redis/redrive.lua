-- koogate: put a dead-lettered event back into the outbox (same id: the billing core dedups).
-- KEYS[1] dead-letter hash  KEYS[2] outbox stream  KEYS[3] attempts hash
-- ARGV[1] event id  ARGV[2] its bookkeeping from now on (Attempts::redriven: the attempt log kept)
-- ARGV[3..] the stream fields of the event
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return 0
end
local fields = {}
for i = 3, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
