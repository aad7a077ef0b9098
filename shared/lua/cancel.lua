-- Cancel a run that has not finished. KEYS: run, steps, waits, children   ARGV: run_ttl_s
-- Returns the status the run had before.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'MISSING' end
if status == 'COMPLETED' or status == 'FAILED' or status == 'CANCELED' or status == 'CRASHED'
  or status == 'TIMED_OUT' or status == 'EXPIRED' then
  return status
end
redis.call('HSET', KEYS[1], 'status', 'CANCELED', 'finished_at', now, 'lease_until', 0,
  'error', 'canceled on request')
-- Tell the result() waiters (conveyor/_results.py): the run id on '<namespace>:ended'.
local ns, id = string.match(KEYS[1], '^([^{]*):{(.*)}:run$')
redis.call('PUBLISH', ns .. ':ended', id)
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[1]) end
return status
