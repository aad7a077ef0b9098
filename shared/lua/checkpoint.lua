-- Save a step's result, fenced: only the worker and attempt that hold the run may write,
-- and the first result saved under a step key stays.
-- KEYS: run, steps   ARGV: worker, attempt, step key, encoded result
-- Returns {'ok'} | {'saved', the result saved before} | {'stale', status}
local r = redis.call('HMGET', KEYS[1], 'status', 'worker', 'attempt')
if r[1] ~= 'EXECUTING' or r[2] ~= ARGV[1] or r[3] ~= ARGV[2] then
  return {'stale', r[1] or 'MISSING'}
end
if redis.call('HSETNX', KEYS[2], ARGV[3], ARGV[4]) == 1 then return {'ok'} end
return {'saved', redis.call('HGET', KEYS[2], ARGV[3])}
