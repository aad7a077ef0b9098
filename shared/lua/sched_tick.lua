-- Move fired schedules to their next fire time, only while the caller holds the leader
-- lease (fenced), and only where the entry still has the time the caller fired from: a
-- schedule updated, paused or deleted meanwhile keeps what that change wrote.
-- KEYS: leader, due index
-- ARGV: token ('epoch:holder'), then triples: key, the fire time it fired from, next fire time
--       ('' removes the entry: its schedule has no record)
-- Returns 1, or 0 when the lease is not the caller's any more (nothing written).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 3 do
  local score = redis.call('ZSCORE', KEYS[2], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    if ARGV[i + 2] == '' then
      redis.call('ZREM', KEYS[2], ARGV[i])
    else
      redis.call('ZADD', KEYS[2], ARGV[i + 2], ARGV[i])
    end
  end
end
return 1
