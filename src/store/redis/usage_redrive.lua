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
-- back into the instance's unpushed usage
local ik = ARGV[1] .. 'inst:' .. redis.call('HGET', rk, 'instance')
if redis.call('EXISTS', ik) == 1 then
  local v = redis.call('HGET', rk, 'value_e4')
  redis.call('HINCRBY', ik, 'usage_unpushed_e4', v)
  local item = redis.call('HGET', rk, 'item')
  if item and item ~= '' then
    redis.call('HINCRBY', ik, 'usage_unpushed_e4:' .. item, v)
  end
end
return 1
