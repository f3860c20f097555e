-- koogate: mark an instance whose account is not known yet, unless it is linked already.
-- KEYS[1] the shard's pending set  KEYS[2] the shard's account-of hash (instance -> customer)
-- ARGV[1] since (UNIX ms)  ARGV[2] instance id
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then
  return 0
end
return redis.call('ZADD', KEYS[1], 'NX', ARGV[1], ARGV[2])
