-- Say on a run why it waits to start (a rate or concurrency limit), while it is queued.
-- KEYS: run   ARGV: reason, not_before (ms; '' to leave it: the run waits for a slot)
-- The claim that starts the run clears the reason; not_before keeps the reaper from
-- republishing a run whose deferred message is due only then.
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'QUEUED' and status ~= 'DELAYED' and status ~= 'RETRYING' then return 0 end
redis.call('HSET', KEYS[1], 'throttle', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'not_before', ARGV[2]) end
return 1
