-- Reopen a run that a dead letter ended FAILED, so that the replayed message runs it.
-- KEYS: run, steps
-- ARGV: dead-letter record id
-- Returns 1 when reopened (QUEUED, no expiry), 0 when the run is gone or ended otherwise.
local r = redis.call('HMGET', KEYS[1], 'status', 'dead_letter')
if r[1] ~= 'FAILED' or r[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'QUEUED', 'lease_until', 0)
redis.call('HDEL', KEYS[1], 'error', 'finished_at', 'dead_letter')
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
return 1
