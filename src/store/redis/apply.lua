-- koogate: apply one Plan atomically (see src/store/plan.rs).
-- KEYS[1] nonce   KEYS[2] kept answer   KEYS[3] subject instance
-- KEYS[4] order   KEYS[5] outbox stream  KEYS[6] legacy kept answer (read only)
-- KEYS[7..] records to read
-- The plan comes as flat arguments (src/store/redis/calls.rs `write_plan_args`), so
-- nothing is decoded here and field lists go to HSET as they are:
-- ARGV[1] nonce ('' = none)  ARGV[2] nonce TTL (s)
-- ARGV[3] dedup: '0' none, '1' KEYS[2], '2' KEYS[2] then KEYS[6]
-- ARGV[4] '1' for a read plan (HGETALL of KEYS[7..])
-- ARGV[5] the subject   ARGV[6] number of branches, then each branch:
--   status ('*' = any other), kept answer (code .. answer; '' = do not keep),
--   n, n field/value pairs for the subject (when the branch has an event, the
--   last pair is 'seq', '' and gets the new sequence number),
--   m, m field/value pairs for the order,
--   '0' (no event) or '1', type, occurred_at, test ('0'/'1'), change (JSON),
--   snapshot: the record as the outbox keeps it when the branch creates it
--   (status '' branch; '' otherwise), stored as it is when no record existed
-- Replies: {'replay'} | {'kept', code .. answer} | {'read', records...}
--        | {'applied', branch number (1-based), seq of the event or 0, prior status}
-- Every key shares one hash tag, so this runs on Redis Cluster too.
-- Redis does not roll a script back, so every check comes before the first write.

local dedup = ARGV[3]
local kept = false
if dedup ~= '0' then
  kept = redis.call('GET', KEYS[2])
  if not kept and dedup == '2' then
    kept = redis.call('GET', KEYS[6])
  end
end

local read = ARGV[4] == '1'
local status, seq, at, number = '', 0, 0, 0
if not kept and not read then
  local now = redis.call('HMGET', KEYS[3], 'status', 'seq')
  status = now[1] or ''
  seq = tonumber(now[2] or '0') or 0
  -- Find the branch of this status (else the '*' one): walk the branch headers.
  local i, any, any_number = 7, 0, 0
  for b = 1, tonumber(ARGV[6]) do
    if ARGV[i] == status then
      at, number = i, b
      break
    elseif ARGV[i] == '*' then
      any, any_number = i, b
    end
    local n = tonumber(ARGV[i + 2])
    local m = tonumber(ARGV[i + 3 + 2 * n])
    local e = i + 4 + 2 * n + 2 * m
    i = e + 1
    if ARGV[e] == '1' then
      i = i + 5
    end
  end
  if at == 0 then
    at, number = any, any_number
  end
  if at == 0 then
    return redis.error_reply('koogate: plan has no branch for status ' .. status)
  end
end

if ARGV[1] ~= '' and not redis.call('SET', KEYS[1], '1', 'EX', ARGV[2], 'NX') then
  return {'replay'}
end

if kept then
  return {'kept', kept}
end

if read then
  local out = {'read'}
  for k = 7, #KEYS do
    out[#out + 1] = redis.call('HGETALL', KEYS[k])
  end
  return out
end

local n = tonumber(ARGV[at + 2])
local set_from, set_to = at + 3, at + 2 + 2 * n
local m = tonumber(ARGV[set_to + 1])
local order_from, order_to = set_to + 2, set_to + 1 + 2 * m
local e = order_to + 1
local event = ARGV[e] == '1'
-- A record this branch creates is exactly its fields: the gateway sent the
-- snapshot encoded, so it is neither read back nor encoded here.
local created = event and ARGV[e + 5] ~= '' and redis.call('EXISTS', KEYS[3]) == 0
if event then
  seq = seq + 1
  ARGV[set_to] = tostring(seq)
end
if n > 0 then
  redis.call('HSET', KEYS[3], unpack(ARGV, set_from, set_to))
end
if m > 0 then
  redis.call('HSET', KEYS[4], unpack(ARGV, order_from, order_to))
end

if event then
  -- The record right after the transition, as HGETALL's flat field/value list.
  local fields = created and ARGV[e + 5] or cjson.encode(redis.call('HGETALL', KEYS[3]))
  redis.call('XADD', KEYS[5], '*',
    'id', 'evt_' .. ARGV[5] .. '_' .. seq,
    'type', ARGV[e + 1],
    'occurred_at', ARGV[e + 2],
    'test', ARGV[e + 3],
    'fields', fields,
    'change', ARGV[e + 4])
else
  seq = 0
end

if dedup ~= '0' and ARGV[at + 1] ~= '' then
  redis.call('SET', KEYS[2], ARGV[at + 1])
end

return {'applied', number, seq, status}
