-- koogate: the metering_sn registry (one hash per shard of the sn), which makes
-- a metering_sn unique across instances (see src/usage/mod.rs).
-- KEYS[1] registry hash (sn -> record content)
-- KEYS[2] claim counts (sn -> requests that claimed it and have not released it)
-- ARGV[1] 'claim' or 'release', then pairs: metering_sn, record content
-- claim:   'new' (registered now), 'same' (registered with this content) or 'conflict';
--          'new' and 'same' count one claim
-- release: a request whose record was refused gives its claim back; the sn is
--          unregistered only when no claim is left. A request whose record was
--          accepted (or found a duplicate) keeps its claim forever, so an sn
--          with a record is never unregistered, whatever concurrent identical
--          requests were refused (issue 15.3).
local out = {}
for i = 2, #ARGV, 2 do
  local sn, content = ARGV[i], ARGV[i + 1]
  local have = redis.call('HGET', KEYS[1], sn)
  if ARGV[1] == 'claim' then
    if not have then
      redis.call('HSET', KEYS[1], sn, content)
      redis.call('HINCRBY', KEYS[2], sn, 1)
      out[#out + 1] = 'new'
    elseif have == content then
      redis.call('HINCRBY', KEYS[2], sn, 1)
      out[#out + 1] = 'same'
    else
      out[#out + 1] = 'conflict'
    end
  else
    if have == content then
      local left = redis.call('HINCRBY', KEYS[2], sn, -1)
      if left <= 0 then
        redis.call('HDEL', KEYS[1], sn)
        redis.call('HDEL', KEYS[2], sn)
      end
    end
    out[#out + 1] = 'ok'
  end
end
return out
