-- End the run of a dead-lettered message FAILED with the reason, unless it has ended
-- already (a CRASHED run stays CRASHED) or a live worker holds it.
-- KEYS: run, steps
-- ARGV: reason, dead-letter record id, run_ttl_s, terminal statuses (',A,B,...,')
-- Returns 'failed' | 'missing' | 'busy' | the terminal status the run had.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', KEYS[1], 'status', 'lease_until')
local status = r[1]
if not status then return 'missing' end
if string.find(ARGV[4], ',' .. status .. ',', 1, true) then return status end
if status == 'EXECUTING' and tonumber(r[2] or '0') > now then return 'busy' end
-- dead_letter names the record, so that replaying it (and only it) reopens the run.
redis.call('HSET', KEYS[1], 'status', 'FAILED', 'error', ARGV[1], 'finished_at', now,
  'lease_until', 0, 'dead_letter', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
-- Tell the result() waiters (conveyor/_results.py): the run id on '<namespace>:ended'.
local ns, id = string.match(KEYS[1], '^([^{]*):{(.*)}:run$')
redis.call('PUBLISH', ns .. ':ended', id)
return 'failed'
