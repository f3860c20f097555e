-- koogate: accept usage records of one shard (the rule is usage::decide in src/usage/mod.rs).
-- KEYS[1] the shard's pending set  KEYS[2] the shard's unpushed set
-- ARGV[1] shard key prefix '<prefix>{sN}:'  ARGV[2] now (UNIX ms)
-- then 8 per record: sn, instance, item, begin, end, value_e4, content, record_time
-- Answers per record: accepted | duplicate | sn_reused | unknown_instance | released | test_instance | overlap:<sn>
local p, now = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV, 8 do
  local sn, inst, item, b, e, v, content, rt =
    ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
  local rk = p .. 'usage:r:' .. sn
  local have = redis.call('HGET', rk, 'content')
  if have then
    out[#out + 1] = (have == content) and 'duplicate' or 'sn_reused'
  else
    local status = redis.call('HGET', p .. 'inst:' .. inst, 'status')
    if not status or status == '' then
      out[#out + 1] = 'unknown_instance'
    elseif status == 'released' then
      out[#out + 1] = 'released'
    elseif redis.call('HGET', p .. 'inst:' .. inst, 'test') == '1' then
      out[#out + 1] = 'test_instance'
    else
      local pk = p .. 'usage:p:' .. string.len(inst) .. ':' .. inst .. ':' .. item
      local prev = redis.call('ZREVRANGEBYSCORE', pk, '(' .. e, '-inf', 'LIMIT', 0, 1)
      local clash = nil
      if prev[1] then
        local prev_end, prev_sn = string.match(prev[1], '^(%d+):(.*)$')
        if tonumber(prev_end) > tonumber(b) then
          clash = prev_sn
        end
      end
      if clash then
        out[#out + 1] = 'overlap:' .. clash
      else
        redis.call('HSET', rk, 'sn', sn, 'instance', inst, 'item', item, 'begin', b, 'end', e,
          'value_e4', v, 'content', content, 'record_time', rt, 'accepted_ms', now,
          'state', 'pending', 'attempts', '0')
        redis.call('ZADD', pk, b, e .. ':' .. sn)
        redis.call('ZADD', KEYS[1], now, sn)
        redis.call('ZADD', KEYS[2], now, sn)
        redis.call('ZADD', p .. 'usage:i:' .. inst, now, sn) -- keys::usage_by_instance
        -- the instance's unpushed usage, in all and per metering item (usage::FIELD_USAGE_UNPUSHED_E4)
        redis.call('HINCRBY', p .. 'inst:' .. inst, 'usage_unpushed_e4', v)
        if item ~= '' then
          redis.call('HINCRBY', p .. 'inst:' .. inst, 'usage_unpushed_e4:' .. item, v)
        end
        out[#out + 1] = 'accepted'
      end
    end
  end
end
return out
