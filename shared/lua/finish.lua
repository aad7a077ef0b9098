-- Record the end of an attempt, fenced by worker and attempt number.
-- KEYS: run, steps, waits, children
-- ARGV: worker, attempt, run_status, attempt_status, output, error, traceback, run_ttl_s,
--       retry_delay_ms
-- run_status RETRYING schedules the next attempt; QUEUED hands the run back (shutdown).
-- Returns {'ok', now} | {'terminal', status} | {'stale', status}
-- Sent again after a lost reply, it answers 'ok' as the first time ('done' names the
-- attempt whose outcome was written).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local record_key = 'a:' .. ARGV[2]
local r = redis.call('HMGET', KEYS[1], 'status', 'worker', 'attempt', record_key, 'done',
  'not_before', 'finished_at')
if r[5] == ARGV[2] and r[2] == ARGV[1] then
  if r[1] == 'RETRYING' then return {'ok', tonumber(r[6])} end
  return {'ok', tonumber(r[7] or now)}
end
-- The attempt record closed: the field and value to write.
local function closed_attempt()
  local rec
  if r[4] then rec = cjson.decode(r[4]) else
    rec = {n = tonumber(ARGV[2]), t0 = now}
    redis.call('HSET', KEYS[1], 'w:' .. ARGV[2], ARGV[1])
  end
  rec.s = ARGV[4]
  rec.t1 = now
  if ARGV[6] ~= '' then rec.e = ARGV[6] end
  if ARGV[7] ~= '' then rec.tb = ARGV[7] end
  return cjson.encode(rec)
end
local status = r[1]
if not status then return {'stale', 'MISSING'} end
if status == 'COMPLETED' or status == 'FAILED' or status == 'CANCELED' or status == 'CRASHED'
  or status == 'TIMED_OUT' or status == 'EXPIRED' then
  if r[3] == ARGV[2] and r[2] == ARGV[1] then
    redis.call('HSET', KEYS[1], record_key, closed_attempt())
  end
  return {'terminal', status}
end
if status ~= 'EXECUTING' or r[2] ~= ARGV[1] or r[3] ~= ARGV[2] then return {'stale', status} end
local run_status = ARGV[3]
if run_status == 'RETRYING' then
  local at = now + tonumber(ARGV[9])
  redis.call('HSET', KEYS[1], record_key, closed_attempt(), 'status', 'RETRYING',
    'not_before', at, 'lease_until', 0, 'error', ARGV[6], 'done', ARGV[2])
  -- Throttled downstream (RateLimited): tried again without using up an attempt.
  if ARGV[4] ~= 'THROTTLED' then redis.call('HINCRBY', KEYS[1], 'failures', 1) end
  return {'ok', at}
end
if run_status == 'QUEUED' then
  redis.call('HSET', KEYS[1], record_key, closed_attempt(), 'status', 'QUEUED', 'lease_until', 0,
    'done', ARGV[2])
  return {'ok', now}
end
-- Terminal: one write for the record, the status and what the run ended with.
local fields = {record_key, closed_attempt(), 'status', run_status, 'finished_at', now,
  'lease_until', 0, 'done', ARGV[2]}
if ARGV[5] ~= '' then fields[#fields + 1] = 'output'; fields[#fields + 1] = ARGV[5] end
if ARGV[6] ~= '' then fields[#fields + 1] = 'error'; fields[#fields + 1] = ARGV[6] end
redis.call('HSET', KEYS[1], unpack(fields))
-- The run's error says why it ended: an earlier attempt's error stays on that attempt only.
if run_status == 'COMPLETED' then redis.call('HDEL', KEYS[1], 'error') end
if run_status == 'FAILED' then redis.call('HINCRBY', KEYS[1], 'failures', 1) end
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[8]) end
-- Tell the result() waiters (conveyor/_results.py): the run id on '<namespace>:ended'.
local ns, id = string.match(KEYS[1], '^([^{]*):{(.*)}:run$')
redis.call('PUBLISH', ns .. ':ended', id)
return {'ok', now}
