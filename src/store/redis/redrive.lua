-- koogate: put a dead-lettered event back into the outbox (same id: the billing core dedups).
-- KEYS[1] dead-letter hash  KEYS[2] outbox stream
-- ARGV[1] event id  ARGV[2..] the stream fields of the event
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return 0
end
local fields = {}
for i = 2, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
