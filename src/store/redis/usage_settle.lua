-- koogate: settle claimed usage records of one shard. Only a pending record
-- changes, so settling twice (two replicas after a lease ran out) counts once.
-- KEYS[1] pending set  KEYS[2] unpushed set  KEYS[3] usage dead-letter set
-- ARGV[1] shard key prefix  ARGV[2] now (UNIX ms)
-- then 5 per record: sn, kind, a, b, c
--   pushed: -           retry: attempts, due, error
--   hold:   due         dead:  code, message
local p, now = ARGV[1], ARGV[2]
-- a record leaves the instance's unpushed usage when pushed or dead: unpushed() of usage_unpushed.lua
for i = 3, #ARGV, 5 do
  local sn, kind, a, b, c = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local rk = p .. 'usage:r:' .. sn
  if redis.call('HGET', rk, 'state') == 'pending' then
    if kind == 'pushed' then
      unpushed(p, rk, true)
      redis.call('HSET', rk, 'state', 'pushed', 'pushed_ms', now, 'held', '')
      redis.call('ZREM', KEYS[1], sn)
      redis.call('ZREM', KEYS[2], sn)
      local ik = p .. 'inst:' .. redis.call('HGET', rk, 'instance')
      if redis.call('EXISTS', ik) == 1 then
        redis.call('HINCRBY', ik, 'usage_e4', redis.call('HGET', rk, 'value_e4'))
        local e = redis.call('HGET', rk, 'end')
        local cur = redis.call('HGET', ik, 'usage_end')
        if not cur or tonumber(e) > tonumber(cur) then
          redis.call('HSET', ik, 'usage_end', e)
        end
        -- per metering item (relate_pkg_instance), for queryInstance's usageInfo[]
        local item = redis.call('HGET', rk, 'item')
        if item and item ~= '' then
          redis.call('HINCRBY', ik, 'usage_e4:' .. item, redis.call('HGET', rk, 'value_e4'))
          local icur = redis.call('HGET', ik, 'usage_end:' .. item)
          if not icur or tonumber(e) > tonumber(icur) then
            redis.call('HSET', ik, 'usage_end:' .. item, e)
          end
        end
      end
    elseif kind == 'retry' then
      redis.call('HSET', rk, 'attempts', a, 'error', c, 'held', '')
      redis.call('ZADD', KEYS[1], b, sn)
    elseif kind == 'hold' then
      redis.call('HSET', rk, 'held', '1')
      redis.call('ZADD', KEYS[1], a, sn)
    elseif kind == 'dead' then
      unpushed(p, rk, true)
      redis.call('HSET', rk, 'state', 'dead', 'code', a, 'msg', b, 'dead_ms', now, 'held', '')
      redis.call('ZREM', KEYS[1], sn)
      redis.call('ZREM', KEYS[2], sn)
      redis.call('ZADD', KEYS[3], now, sn)
    end
  end
end
return 1
