-- Store a dead-letter record, keeping at most `max` (the oldest go first).
-- KEYS: leader, records (hash id -> record), index (sorted set id -> time)
-- ARGV: token ('epoch:holder'; '' from the command line, which does not lead), id, record, max
-- Returns the number of old records dropped, or -1 when the token's lease is gone (refused).
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], now, ARGV[2])
local over = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[4])
if over <= 0 then return 0 end
local old = redis.call('ZRANGE', KEYS[3], 0, over - 1)
redis.call('ZREM', KEYS[3], unpack(old))
redis.call('HDEL', KEYS[2], unpack(old))
return over
