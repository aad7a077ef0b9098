-- Take a start from a rate limit (GCRA on Redis's clock), or reserve a later one.
-- KEYS: the limit's hash (tat: reservations' theoretical arrival time, µs; stat: the same
--   for starts made; paused_until, ms; epoch)
-- ARGV: interval_us (the time one start uses up), burst,
--       the epoch and time (ms) of a reservation the run holds ('' for none)
-- Returns {'go', wait_ms} | {'later', at_ms, epoch, now_ms}.
-- 'later': the run may start at at_ms and holds that reservation until a pause
-- (rate_pause.lua, which bumps the epoch) voids it. 'go': it starts in wait_ms. Two
-- clocks: reservations space the runs out, and a second GCRA over the starts themselves
-- keeps the bound (rate * T + burst in any window T) when reserved runs come back late
-- and together (a busy broker delays the ladder): each then waits its own turn, briefly.
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)
local r = redis.call('HMGET', KEYS[1], 'tat', 'paused_until', 'epoch', 'stat')
local paused = tonumber(r[2] or '0')
local epoch = r[3] or '0'
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(r[1] or '0')

local function start()
  local stat = math.max(tonumber(r[4] or '0'), now_us, paused * 1000) + interval
  redis.call('HSET', KEYS[1], 'stat', string.format('%d', stat))
  redis.call('PEXPIRE', KEYS[1],
    math.ceil((math.max(tat, stat) - now_us) / 1000) + math.max(paused - now, 0) + 60000)
  return {'go', math.max(0, math.ceil((stat - burst * interval - now_us) / 1000))}
end

if ARGV[3] == epoch and ARGV[4] ~= '' and paused <= now then return start() end
tat = math.max(tat, now_us, paused * 1000) + interval
-- The start conforms once no more than `burst` intervals are reserved ahead of it.
local at_us = math.max(tat - burst * interval, paused * 1000)
redis.call('HSET', KEYS[1], 'tat', string.format('%d', tat))
if at_us <= now_us then return start() end
redis.call('PEXPIRE', KEYS[1], math.ceil((tat - now_us) / 1000) + math.max(paused - now, 0) + 60000)
return {'later', math.ceil(at_us / 1000), epoch, now}
