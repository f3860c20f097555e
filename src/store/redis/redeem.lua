-- koogate: redeem a purchase order once (stored-value card recharge).
-- KEYS[1] order record  KEYS[2..] instance records of the order's lines
-- ARGV[1] customer id  ARGV[2] redeemed_by  ARGV[3] redeemed_at
-- Returns {'not_found'} | {'released'} | {'already', fields...} | {'redeemed', fields...}
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'not_found'}
end
local customer = redis.call('HGET', KEYS[1], 'customer_id')
if not customer or customer ~= ARGV[1] then
  return {'not_found'}
end
if redis.call('HEXISTS', KEYS[1], 'redeemed_at') == 1 then
  return {'already', redis.call('HGETALL', KEYS[1])}
end
for i = 2, #KEYS do
  if redis.call('HGET', KEYS[i], 'status') == 'released' then
    return {'released'}
  end
end
redis.call('HSET', KEYS[1], 'redeemed_at', ARGV[3], 'redeemed_by', ARGV[2])
return {'redeemed', redis.call('HGETALL', KEYS[1])}
