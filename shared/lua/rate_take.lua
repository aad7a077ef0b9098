-- Take a start from a rate limit (GCRA on Redis's clock), or reserve a later one.
-- KEYS: the limit's hash (tat: theoretical arrival time, µs; paused_until, ms; epoch)
-- ARGV: interval_us (the time one start uses up), burst,
--       the epoch and time (ms) of a reservation the run holds ('' for none)
-- Returns {'go'} | {'later', at_ms, epoch, now_ms}: the run may start at at_ms, and then holds a
-- reservation that a pause (rate_pause.lua, which bumps the epoch) cancels.
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)
local r = redis.call('HMGET', KEYS[1], 'tat', 'paused_until', 'epoch')
local paused = tonumber(r[2] or '0')
local epoch = r[3] or '0'
if ARGV[3] == epoch and ARGV[4] ~= '' and paused <= now then return {'go'} end
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local base = math.max(tonumber(r[1] or '0'), now_us, paused * 1000)
local tat = base + interval
-- The start conforms once no more than `burst` intervals are reserved ahead of it.
local at_us = math.max(tat - burst * interval, paused * 1000)
redis.call('HSET', KEYS[1], 'tat', string.format('%d', tat))
-- Kept while reservations or a pause are ahead, then it forgets the limit.
redis.call('PEXPIRE', KEYS[1], math.ceil((tat - now_us) / 1000) + math.max(paused - now, 0) + 60000)
if at_us <= now_us then return {'go'} end
return {'later', math.ceil(at_us / 1000), epoch, now}
