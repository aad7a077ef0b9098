-- End an attempt that waits for its waitpoints: the run becomes WAITING and holds no
-- lease, or, when everything it waited for completed meanwhile, QUEUED to run again now.
-- KEYS: run, waits   ARGV: worker, attempt, the attempt's traceparent ('' when not traced:
--       kept for the link from the attempt that resumes the run)
-- Returns {'waiting', earliest timer ms (0: none), now} | {'resume', now} | {'stale', status}
-- Sent again after a lost reply, it answers as the first time ('done' names the attempt).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', KEYS[1], 'status', 'worker', 'attempt', 'done', 'a:' .. ARGV[2])
local function earliest()
  local first = 0
  local waits = redis.call('HVALS', KEYS[2])
  for i = 1, #waits do
    local untl = tonumber(cjson.decode(waits[i])['until'])
    if untl > 0 and (first == 0 or untl < first) then first = untl end
  end
  return first
end
if r[4] == ARGV[2] and r[2] == ARGV[1] then
  if r[1] == 'WAITING' then return {'waiting', earliest(), now} end
  return {'resume', now}
end
if r[1] ~= 'EXECUTING' or r[2] ~= ARGV[1] or r[3] ~= ARGV[2] then
  return {'stale', r[1] or 'MISSING'}
end
local rec = {n = tonumber(ARGV[2]), t0 = now}
if r[5] then rec = cjson.decode(r[5]) else redis.call('HSET', KEYS[1], 'w:' .. ARGV[2], ARGV[1]) end
rec.s = 'WAITING'
rec.t1 = now
local status = 'WAITING'
if redis.call('HLEN', KEYS[2]) == 0 then status = 'QUEUED' end
redis.call('HSET', KEYS[1], 'a:' .. ARGV[2], cjson.encode(rec), 'status', status,
  'lease_until', 0, 'done', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'trace_last', ARGV[3]) end
if status == 'QUEUED' then return {'resume', now} end
-- The reaper wakes a WAITING run whose timer message was lost once not_before has passed.
local timer = earliest()
redis.call('HSET', KEYS[1], 'not_before', timer)
return {'waiting', timer, now}
