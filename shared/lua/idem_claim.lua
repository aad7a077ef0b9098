-- Claim an idempotency key for a run (Redis Cluster: the key is in a slot of its own, so
-- create.lua cannot check it with the run). KEYS: idempotency key   ARGV: run_id, ttl_ms
-- Returns the run the key names: this one if it was free (or already this run's: a claim
-- sent again after its reply was lost), else the run of the trigger that claimed it first.
local owner = redis.call('GET', KEYS[1])
if owner then return owner end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
