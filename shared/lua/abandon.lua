-- Fail a run whose message never reached the broker, if it never started.
-- KEYS: run   ARGV: error, run_ttl_s
-- Only a run still QUEUED or DELAYED with no attempt: a worker may have got a copy of the
-- message after all (a lost confirm), and a started run is left to it.
-- Returns 1 if the run was failed, else 0.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local status = redis.call('HGET', KEYS[1], 'status')
if (status ~= 'QUEUED' and status ~= 'DELAYED')
  or tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0') ~= 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'FAILED', 'error', ARGV[1], 'finished_at', now)
redis.call('EXPIRE', KEYS[1], ARGV[2])
-- Tell the result() waiters (conveyor/_results.py): the run id on '<namespace>:ended'.
local ns, id = string.match(KEYS[1], '^([^{]*):{(.*)}:run$')
redis.call('PUBLISH', ns .. ':ended', id)
return 1
