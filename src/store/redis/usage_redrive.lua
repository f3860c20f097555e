-- koogate: put a dead usage record back to be pushed (same metering_sn: KooGallery dedups).
-- KEYS[1] pending set  KEYS[2] unpushed set  KEYS[3] usage dead-letter set
-- ARGV[1] shard key prefix  ARGV[2] now (UNIX ms)  ARGV[3] metering_sn
if not redis.call('ZSCORE', KEYS[3], ARGV[3]) then
  return 0
end
local rk = ARGV[1] .. 'usage:r:' .. ARGV[3]
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('HSET', rk, 'state', 'pending', 'attempts', '0', 'code', '', 'msg', '', 'error', '', 'dead_ms', '')
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], redis.call('HGET', rk, 'accepted_ms'), ARGV[3])
-- back into the instance's unpushed usage (unpushed() of usage_unpushed.lua)
unpushed(ARGV[1], rk, false)
return 1
