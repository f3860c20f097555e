-- koogate: put in front of usage_settle.lua and usage_redrive.lua (each stays one script, one EVALSHA).
-- A usage record (hash rk) joins or leaves its instance's unpushed usage, in total and per metering
-- item; nothing when the instance is gone. p: the shard key prefix.
local function unpushed(p, rk, leaves)
  local ik = p .. 'inst:' .. redis.call('HGET', rk, 'instance')
  if redis.call('EXISTS', ik) == 1 then
    local v = redis.call('HGET', rk, 'value_e4')
    if leaves then
      v = -tonumber(v)
    end
    redis.call('HINCRBY', ik, 'usage_unpushed_e4', v)
    local item = redis.call('HGET', rk, 'item')
    if item and item ~= '' then
      redis.call('HINCRBY', ik, 'usage_unpushed_e4:' .. item, v)
    end
  end
end
