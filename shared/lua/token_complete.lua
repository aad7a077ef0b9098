-- Complete a wait token with its data, once, and only before it times out.
-- KEYS: token   ARGV: data
-- Returns {'ok', waiting run id or '', its step key or ''} | {'missing'} | {status}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', KEYS[1], 'status', 'expires_at', 'run', 'step')
if not r[1] then return {'missing'} end
if r[1] == 'PENDING' and tonumber(r[2]) <= now then
  redis.call('HSET', KEYS[1], 'status', 'TIMED_OUT')
  return {'TIMED_OUT'}
end
if r[1] ~= 'PENDING' then return {r[1]} end
redis.call('HSET', KEYS[1], 'status', 'COMPLETED', 'data', ARGV[1], 'completed_at', now)
return {'ok', r[3] or '', r[4] or ''}
