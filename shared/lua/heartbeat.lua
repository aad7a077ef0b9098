-- Extend the lease of a run this worker is executing; tells the worker when to stop.
-- KEYS: run   ARGV: worker, attempt, lease_ms
-- Returns 'ok' or the status that means the worker no longer owns the run.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', KEYS[1], 'status', 'worker', 'attempt')
if r[1] ~= 'EXECUTING' then return r[1] or 'MISSING' end
if r[2] ~= ARGV[1] or r[3] ~= ARGV[2] then return 'LOST' end
redis.call('HSET', KEYS[1], 'lease_until', now + tonumber(ARGV[3]))
return 'ok'
