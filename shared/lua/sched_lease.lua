-- The scheduler's leader lease with a fencing token.
-- KEYS: leader, epoch counter
-- ARGV: holder, ttl_ms, op ('acquire' | 'renew' | 'release'), epoch (renew and release)
-- The leader key holds the token "epoch:holder" and expires on the server's clock; every
-- acquisition takes a new epoch, so a leader that lost the lease can never match again.
-- Returns the epoch now held, or 0 (not acquired, or no longer ours); release returns 1 or 0.
local current = redis.call('GET', KEYS[1])
if ARGV[3] == 'acquire' then
  if current then return 0 end
  local epoch = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], epoch .. ':' .. ARGV[1], 'PX', ARGV[2])
  return epoch
end
if current ~= ARGV[4] .. ':' .. ARGV[1] then return 0 end
if ARGV[3] == 'renew' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(ARGV[4])
end
redis.call('DEL', KEYS[1])
return 1
