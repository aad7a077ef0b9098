-- Update the due index, only while the caller still holds the leader lease (fenced).
-- KEYS: leader, due index
-- ARGV: token ('epoch:holder'), n, n run ids to remove, then score and run id pairs
-- Returns 1, or 0 when the lease is not the caller's any more (nothing written).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local n = tonumber(ARGV[2])
if n > 0 then redis.call('ZREM', KEYS[2], unpack(ARGV, 3, 2 + n)) end
-- XX: an entry removed meanwhile (a replay re-adds its own) is not brought back.
if #ARGV > 2 + n then redis.call('ZADD', KEYS[2], 'XX', unpack(ARGV, 3 + n)) end
return 1
