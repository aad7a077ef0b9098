-- A concurrency limit's slots: leases held by runs, and the runs parked until one frees.
-- KEYS (one hash tag): holders (zset run -> lease end, ms), owners (hash run -> worker
--   '\n' concurrency key; worker '' while reserved for a woken run), counts (hash:
--   'h:'..key held, 'p:'..key parked, 'r:'..key the key's last round, 'round' the round
--   being served), parked (zset run -> round), meta (hash run -> key '\n' queue '\n' message)
-- ARGV: op, limit, key_limit, lease_ms, worker, then by op:
--   take run key queue message -> {'go'} | {'parked', running} | {'held', ms}
--   release run                -> woken runs: {run, queue, message, ...}
--   sweep                      -> woken runs (expired leases freed, lost wake-ups redone)
--   renew run...               -> how many of those runs this worker still holds
-- Fairness: the n-th run a key parks gets round max(n, the round being served) + 1, and
-- runs wake in round order, so keys take turns whatever their backlogs.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local H, O, C, P, M = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local op, limit, key_limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local lease, worker = tonumber(ARGV[4]), ARGV[5]

local function count(field) return tonumber(redis.call('HGET', C, field) or '0') end

local function forget_key(key)
  if count('h:' .. key) <= 0 and count('p:' .. key) <= 0 then
    redis.call('HDEL', C, 'h:' .. key, 'p:' .. key, 'r:' .. key)
  end
end

local function park(run, key, round)
  redis.call('ZADD', P, round, run)
  redis.call('HINCRBY', C, 'p:' .. key, 1)
end

local function hold(run, owner, key)
  redis.call('ZADD', H, now + lease, run)
  redis.call('HSET', O, run, owner .. '\n' .. key)
end

local function unhold(run, key)
  redis.call('ZREM', H, run)
  redis.call('HDEL', O, run)
  redis.call('HINCRBY', C, 'h:' .. key, -1)
end

local function split(s)
  local i = string.find(s, '\n', 1, true)
  return string.sub(s, 1, i - 1), string.sub(s, i + 1)
end

-- Leases that ran out: a dead worker's slot frees; a woken run whose message never came
-- (lost with the worker that woke it) parks again at the front.
local function purge()
  local expired = redis.call('ZRANGEBYSCORE', H, '-inf', now, 'LIMIT', 0, 100)
  for _, run in ipairs(expired) do
    local owner, key = split(redis.call('HGET', O, run) or '\n')
    unhold(run, key)
    if owner == '' and redis.call('HEXISTS', M, run) == 1 then
      park(run, key, count('round'))
    else
      forget_key(key)
    end
  end
end

local function wake()
  local out = {}
  local free = limit - redis.call('ZCARD', H)
  -- Read in pages about the size of the free slots (a release frees one): runs of keys at
  -- their per-key limit stay in place, up to 200 of them are looked past.
  local skipped = 0
  while free > 0 and skipped < 200 do
    local page = redis.call('ZRANGE', P, skipped, skipped + math.max(8, free * 4) - 1, 'WITHSCORES')
    if #page == 0 then break end
    for i = 1, #page, 2 do
      local run = page[i]
      local meta = redis.call('HGET', M, run)
      if not meta then
        redis.call('ZREM', P, run)
      else
        local key, rest = split(meta)
        if count('h:' .. key) < key_limit then
          redis.call('ZREM', P, run)
          redis.call('HINCRBY', C, 'p:' .. key, -1)
          redis.call('HINCRBY', C, 'h:' .. key, 1)
          hold(run, '', key)
          redis.call('HSET', C, 'round', page[i + 1])
          local queue, message = split(rest)
          out[#out + 1] = run
          out[#out + 1] = queue
          out[#out + 1] = message
          free = free - 1
          if free == 0 then break end
        else
          skipped = skipped + 1
        end
      end
    end
  end
  return out
end

purge()
if op == 'take' then
  local run, key = ARGV[6], ARGV[7]
  local held = redis.call('HGET', O, run)
  if held then
    local owner = split(held)
    if owner ~= '' and owner ~= worker then
      -- Running in another worker (a second copy of its message): come back later.
      return {'held', redis.call('ZSCORE', H, run) - now}
    end
    hold(run, worker, key)
    redis.call('HDEL', M, run)
    return {'go'}
  end
  if redis.call('HEXISTS', M, run) == 1 then return {'parked', redis.call('ZCARD', H)} end
  local running = redis.call('ZCARD', H)
  if running < limit and count('h:' .. key) < key_limit and count('p:' .. key) == 0 then
    redis.call('HINCRBY', C, 'h:' .. key, 1)
    hold(run, worker, key)
    return {'go'}
  end
  local round = math.max(count('r:' .. key), count('round')) + 1
  redis.call('HSET', C, 'r:' .. key, round)
  park(run, key, round)
  redis.call('HSET', M, run, key .. '\n' .. ARGV[8] .. '\n' .. ARGV[9])
  return {'parked', running}
end
if op == 'release' then
  local run = ARGV[6]
  local held = redis.call('HGET', O, run)
  if held then
    local owner, key = split(held)
    if owner == worker then
      unhold(run, key)
      forget_key(key)
    end
  end
  return wake()
end
if op == 'renew' then
  local n = 0
  for i = 6, #ARGV do
    local held = redis.call('HGET', O, ARGV[i])
    if held and split(held) == worker then
      redis.call('ZADD', H, now + lease, ARGV[i])
      n = n + 1
    end
  end
  return n
end
return wake()
