-- Write or delete a schedule and its entry in the due index (shared/schedules.py).
-- KEYS: schedules hash, due index
-- ARGV: key, record ('' deletes it), next fire ms ('' keeps it out of the due index: paused),
--       keep ('1': a record equal to the stored one keeps its next fire time)
-- Returns 1 when something changed, 0 when not (unchanged, or nothing to delete).
local old = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
if ARGV[4] == '1' and old == ARGV[2] then
  -- The same schedule declared again (a scheduler restart): its ticks go on where they were.
  if ARGV[3] ~= '' and not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
    redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  end
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
end
return 1
