-- koogate: the metering_sn registry (one hash per shard of the sn), which makes
-- a metering_sn unique across instances (see src/usage/mod.rs).
-- KEYS[1] registry hash
-- ARGV[1] 'claim' or 'release', then pairs: metering_sn, record content
-- claim:   'new' (registered now), 'same' (registered with this content) or 'conflict'
-- release: removes an sn still registered with this content (its record was refused)
local out = {}
for i = 2, #ARGV, 2 do
  local sn, content = ARGV[i], ARGV[i + 1]
  local have = redis.call('HGET', KEYS[1], sn)
  if ARGV[1] == 'claim' then
    if not have then
      redis.call('HSET', KEYS[1], sn, content)
      out[#out + 1] = 'new'
    elseif have == content then
      out[#out + 1] = 'same'
    else
      out[#out + 1] = 'conflict'
    end
  else
    if have == content then
      redis.call('HDEL', KEYS[1], sn)
    end
    out[#out + 1] = 'ok'
  end
end
return out
