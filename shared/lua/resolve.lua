-- A waitpoint's outcome reaches the run waiting for it (a child run ended): saved as the
-- wait's step result, and a WAITING run with nothing left to wait for becomes QUEUED.
-- KEYS: run, steps, waits   ARGV: step key, ref (the child run id), result
-- Returns {'wake', task, queue, payload, tags, scheduled_at, concurrency key, trace context,
--       traceparent of the attempt that suspended} | {'ok'} | {'gone'}
-- Idempotent: a result already saved stays, and only the call that empties the waits wakes.
local r = redis.call('HMGET', KEYS[1], 'status', 'task', 'queue', 'payload', 'tags',
  'scheduled_at', 'ckey', 'trace', 'trace_last')
if not r[1] then return {'gone'} end
local raw = redis.call('HGET', KEYS[3], ARGV[1])
if not raw or cjson.decode(raw)['ref'] ~= ARGV[2] then return {'ok'} end
redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[3])
redis.call('HDEL', KEYS[3], ARGV[1])
if r[1] == 'WAITING' and redis.call('HLEN', KEYS[3]) == 0 then
  -- not_before held the earliest timer of the waits (for the reaper): nothing waits now.
  redis.call('HSET', KEYS[1], 'status', 'QUEUED', 'not_before', 0)
  return {'wake', r[2], r[3], r[4], r[5] or '[]', r[6] or '', r[7] or '', r[8] or '',
    r[9] or ''}
end
return {'ok'}
