-- Delete an idempotency key if it still names the given run (an abandoned run's key).
-- KEYS: idempotency key   ARGV: run_id
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
