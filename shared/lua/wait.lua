-- Record what a run waits for (child runs, sleeps), fenced like a checkpoint: only the
-- worker and attempt that hold the run may add waitpoints. A wait seen before keeps its
-- first record (a sleep keeps the time it ends at); a timer that is due is resolved here.
-- KEYS: run, steps, waits, children
-- ARGV: worker, attempt, then per wait: step key, kind, ref, until_ms (0: none),
--       delay_ms (-1: none; else until = now + delay_ms on first record)
-- Returns {'stale', status} | {'ok', then per wait: 'done', result | 'pending', until}
local r = redis.call('HMGET', KEYS[1], 'status', 'worker', 'attempt')
if r[1] ~= 'EXECUTING' or r[2] ~= ARGV[1] or r[3] ~= ARGV[2] then
  return {'stale', r[1] or 'MISSING'}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {'ok'}
for i = 3, #ARGV, 5 do
  local key, kind, ref = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local saved = redis.call('HGET', KEYS[2], key)
  if saved then
    out[#out + 1] = 'done'
    out[#out + 1] = saved
  else
    local raw = redis.call('HGET', KEYS[3], key)
    local untl
    if raw then
      untl = cjson.decode(raw)['until']
    else
      untl = tonumber(ARGV[i + 3])
      local delay = tonumber(ARGV[i + 4])
      if delay >= 0 then untl = now + delay end
      redis.call('HSET', KEYS[3], key, cjson.encode({kind = kind, ref = ref, ['until'] = untl}))
      if kind == 'child' then redis.call('RPUSH', KEYS[4], ref) end
    end
    if kind == 'sleep' and untl <= now then
      -- Sleeps end by themselves: the wait is over once its time has come.
      saved = '{"ok":true}'
      redis.call('HSET', KEYS[2], key, saved)
      redis.call('HDEL', KEYS[3], key)
      out[#out + 1] = 'done'
      out[#out + 1] = saved
    else
      out[#out + 1] = 'pending'
      out[#out + 1] = untl
    end
  end
end
return out
