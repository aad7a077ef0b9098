-- Pause a rate limit for every worker (the downstream said 429, retry after ...).
-- KEYS: the limit's hash   ARGV: pause_ms, interval_us, burst
-- Reservations made before are void (new epoch): their runs reserve again after the pause.
-- The pause ends at the steady rate, one start per interval, not with a burst that the
-- downstream, which just pushed back, would refuse again.
-- Returns the time (ms) the pause ends.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', KEYS[1], 'tat', 'paused_until')
local untl = math.max(tonumber(r[2] or '0'), now + tonumber(ARGV[1]))
local interval, burst = tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = math.max(tonumber(r[1] or '0'), untl * 1000 + (burst - 1) * interval)
redis.call('HSET', KEYS[1], 'paused_until', untl, 'tat', string.format('%d', tat))
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('PEXPIRE', KEYS[1], math.ceil(tat / 1000) - now + 60000)
return untl
