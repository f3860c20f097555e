-- koogate: claim due usage records of one shard for a lease.
-- KEYS[1] the shard's pending set
-- ARGV[1] shard key prefix  ARGV[2] now (UNIX ms)  ARGV[3] lease end (UNIX ms)  ARGV[4] most records
-- Answers per record: its fields (HGETALL) and its instance's status.
local p = ARGV[1]
local sns = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, sn in ipairs(sns) do
  local rk = p .. 'usage:r:' .. sn
  local inst = redis.call('HGET', rk, 'instance')
  if inst then
    redis.call('ZADD', KEYS[1], ARGV[3], sn)
    local status = redis.call('HGET', p .. 'inst:' .. inst, 'status') or ''
    out[#out + 1] = {redis.call('HGETALL', rk), status}
  else
    redis.call('ZREM', KEYS[1], sn)
  end
end
return out
