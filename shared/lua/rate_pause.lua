-- Pause a rate limit for every worker (the downstream said 429, retry after ...).
-- KEYS: the limit's hash   ARGV: pause_ms
-- Reservations made before are void (new epoch): their runs reserve again after the pause.
-- Returns the time (ms) the pause ends.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local untl = math.max(tonumber(redis.call('HGET', KEYS[1], 'paused_until') or '0'),
  now + tonumber(ARGV[1]))
redis.call('HSET', KEYS[1], 'paused_until', untl)
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local tat = tonumber(redis.call('HGET', KEYS[1], 'tat') or '0')
redis.call('PEXPIRE', KEYS[1], math.max(untl - now, math.ceil(tat / 1000) - now) + 60000)
return untl
