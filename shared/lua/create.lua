-- Create a run, or return the existing one for the same idempotency key.
-- KEYS: run, idempotency (or the run key again when unused), runs index
-- ARGV: run_id, task, queue, payload, tags, idem_key, idem_ttl_ms, delay_ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[6] ~= '' then
  local existing = redis.call('GET', KEYS[2])
  if existing then return {0, existing} end
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[7])
end
-- A worker that got the message first has created the run already (see Client._trigger).
if redis.call('EXISTS', KEYS[1]) == 1 then return {1, ARGV[1], now} end
local delay = tonumber(ARGV[8])
local status = 'QUEUED'
if delay > 0 then
  status = 'DELAYED'
  redis.call('HSET', KEYS[1], 'not_before', now + delay)
end
redis.call('HSET', KEYS[1], 'task', ARGV[2], 'queue', ARGV[3], 'status', status,
  'payload', ARGV[4], 'tags', ARGV[5], 'idem', ARGV[6], 'created_at', now,
  'attempt', 0, 'failures', 0, 'crashes', 0)
redis.call('ZADD', KEYS[3], now, ARGV[1])
return {1, ARGV[1], now}
