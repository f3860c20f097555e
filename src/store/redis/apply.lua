-- koogate: apply one Plan atomically (see src/store/plan.rs).
-- KEYS[1] nonce   KEYS[2] kept answer   KEYS[3] subject instance
-- KEYS[4] order   KEYS[5] outbox stream  KEYS[6] legacy kept answer (read only)
-- KEYS[7..] records to read
-- ARGV[1] the plan as JSON
-- Every key shares one hash tag, so this runs on Redis Cluster too.
-- Redis does not roll a script back, so every check comes before the first write.
local plan = cjson.decode(ARGV[1])

if plan.nonce and redis.call('EXISTS', KEYS[1]) == 1 then
  return {'replay'}
end

local function remember_nonce()
  if plan.nonce then
    redis.call('SET', KEYS[1], '1', 'EX', plan.nonce_ttl_secs)
  end
end

if plan.dedup then
  local kept = redis.call('GET', KEYS[2])
  if not kept and plan.dedup_legacy then
    kept = redis.call('GET', KEYS[6])
  end
  if kept then
    remember_nonce()
    return {'kept', string.sub(kept, 1, 6), string.sub(kept, 7)}
  end
end

if plan.read then
  local out = {'read'}
  for i = 7, #KEYS do
    out[#out + 1] = redis.call('HGETALL', KEYS[i])
  end
  remember_nonce()
  return out
end

local status = redis.call('HGET', KEYS[3], 'status') or ''
local branch = plan.branches[status] or plan.branches['*']
if not branch then
  return redis.error_reply('koogate: plan has no branch for status ' .. status)
end

remember_nonce()

local function hset(key, fields)
  local flat = {}
  for k, v in pairs(fields) do
    flat[#flat + 1] = k
    flat[#flat + 1] = v
  end
  if #flat > 0 then
    redis.call('HSET', key, unpack(flat))
  end
end

hset(KEYS[3], branch.set or {})
hset(KEYS[4], branch.order_set or {})

local event_id = ''
if branch.event then
  local seq = redis.call('HINCRBY', KEYS[3], 'seq', 1)
  event_id = 'evt_' .. plan.subject .. '_' .. seq
  local flat = redis.call('HGETALL', KEYS[3])
  local record = {}
  for i = 1, #flat, 2 do
    record[flat[i]] = flat[i + 1]
  end
  redis.call('XADD', KEYS[5], '*',
    'id', event_id,
    'type', branch.event.type,
    'occurred_at', branch.event.occurred_at,
    'test', branch.event.test and '1' or '0',
    'record', cjson.encode(record),
    'change', branch.event.change)
end

if branch.keep and plan.dedup then
  redis.call('SET', KEYS[2], branch.code .. branch.answer)
end

return {'applied', branch.code, branch.answer, event_id, status}
