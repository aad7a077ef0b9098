-- Create a wait token, or find the one created before under this id (a replayed step).
-- KEYS: token   ARGV: run id ('' for none), timeout_ms, key ttl_s (beyond the timeout)
-- Returns the token's expiry (epoch ms).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expires = redis.call('HGET', KEYS[1], 'expires_at')
if expires then return tonumber(expires) end
expires = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'PENDING', 'created_at', now, 'expires_at', expires,
  'creator', ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]) * 1000)
return expires
