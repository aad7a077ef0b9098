-- A run's step starts waiting for a token: the token learns who waits; if it is over
-- already (completed, or past its expiry: then it times out now), the outcome is returned.
-- KEYS: token   ARGV: run id, step key
-- Returns {'pending'} | {'COMPLETED', data} | {'TIMED_OUT'} | {'missing'}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', KEYS[1], 'status', 'expires_at', 'data')
if not r[1] then return {'missing'} end
redis.call('HSET', KEYS[1], 'run', ARGV[1], 'step', ARGV[2])
if r[1] == 'PENDING' and tonumber(r[2]) <= now then
  redis.call('HSET', KEYS[1], 'status', 'TIMED_OUT')
  return {'TIMED_OUT'}
end
if r[1] == 'PENDING' then return {'pending'} end
if r[1] == 'COMPLETED' then return {'COMPLETED', r[3]} end
return {r[1]}
