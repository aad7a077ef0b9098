-- End a run that never started and is past its ttl: EXPIRED. The reaper's, for a run whose
-- message is lost (claim.lua does the same for a delivered one).
-- KEYS: run, steps, waits   ARGV: run_ttl_s
-- Only a run still QUEUED or DELAYED with no attempt and past its expires_at: one that a
-- worker started meanwhile is left to it.
-- Returns {'expired', parent, parent step, error} | {'no', status}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'expires_at', 'ttl', 'parent',
  'parent_step')
if (r[1] ~= 'QUEUED' and r[1] ~= 'DELAYED') or r[2] ~= '0' or not r[3]
  or tonumber(r[3]) > now then
  return {'no', r[1] or 'MISSING'}
end
local reason = 'not started within its ttl of ' .. tonumber(r[4] or '0') / 1000
  .. 's (no worker took it in time)'
redis.call('HSET', KEYS[1], 'status', 'EXPIRED', 'finished_at', now, 'error', reason)
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[1]) end
-- Tell the result() waiters (conveyor/_results.py): the run id on '<namespace>:ended'.
local ns, id = string.match(KEYS[1], '^([^{]*):{(.*)}:run$')
redis.call('PUBLISH', ns .. ':ended', id)
return {'expired', r[5] or '', r[6] or '', reason}
