-- Decide what a delivered message means for its run, and start an attempt if it may run.
-- KEYS: run, steps, waits, children (not touched: sent so that claim and finish share one
--       packing of a run's keys)
-- ARGV: worker, lease_ms, max_crashes, run_ttl_s, alone ('1': nothing else runs in the worker),
--       claim token (unique per delivery in the worker: the same claim sent again after a
--       lost reply gets the same answer, not 'busy' and later a crash)
-- Returns {'run', attempt, failures, crashes, parent, parent step, root, checkpoints...}
--       | {'drop', status[, parent, parent step, output, error]} (also for a run that it
--         ended EXPIRED: never started, and past its ttl)
--       | {'busy', ms} | {'early', ms} | {'crashed', reason} | {'missing'} | {'alone', crashes}
--       | {'tokens', step key, token id, ...} (a WAITING run's tokens past their timeout)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', KEYS[1], 'status', 'lease_until', 'not_before', 'attempt',
  'crashes', 'failures', 'worker', 'started_at', 'claim', 'parent', 'parent_step', 'root',
  'expires_at')
local status = r[1]
if not status then return {'missing'} end
if status == 'COMPLETED' or status == 'FAILED' or status == 'CANCELED' or status == 'CRASHED'
  or status == 'TIMED_OUT' or status == 'EXPIRED' then
  -- A child run's end must reach its parent before its message goes: the worker that
  -- wrote it may have died between the two.
  if r[10] then
    local o = redis.call('HMGET', KEYS[1], 'output', 'error')
    return {'drop', status, r[10], r[11] or '', o[1] or '', o[2] or ''}
  end
  return {'drop', status}
end
if status == 'WAITING' then
  -- Woken by a timer (or a stray copy of its message): sleeps that are due are over.
  local waits = redis.call('HGETALL', KEYS[3])
  local first, left, tokens = 0, 0, {'tokens'}
  for i = 1, #waits, 2 do
    local w = cjson.decode(waits[i + 1])
    local untl = tonumber(w['until'])
    if w.kind == 'sleep' and untl <= now then
      redis.call('HSET', KEYS[2], waits[i], '{"ok":true}')
      redis.call('HDEL', KEYS[3], waits[i])
    else
      left = left + 1
      if untl > 0 and (first == 0 or untl < first) then first = untl end
      -- A token past its timeout: the token (in its own slot) decides whether it timed
      -- out or was completed just before; the worker asks it and claims again.
      if w.kind == 'token' and untl <= now then
        tokens[#tokens + 1] = waits[i]
        tokens[#tokens + 1] = w.ref
      end
    end
  end
  if #tokens > 1 then return tokens end
  if left > 0 then
    if first > now then return {'early', first - now} end
    return {'drop', 'WAITING'}
  end
  redis.call('HSET', KEYS[1], 'status', 'QUEUED', 'not_before', 0)
  status = 'QUEUED'
  r[3] = false
end
local crashes = tonumber(r[5] or '0')
-- Checkpoints and the answer for an attempt that has started.
local function started(n)
  local out = {'run', n, tonumber(r[6] or '0'), crashes, r[10] or '', r[11] or '', r[12] or ''}
  local cps = redis.call('HGETALL', KEYS[2])
  for i = 1, #cps do out[#out + 1] = cps[i] end
  return out
end
if status == 'EXECUTING' and r[7] == ARGV[1] and r[9] == ARGV[6] then
  -- This very claim was applied before and its reply lost: the same attempt, a fresh lease.
  redis.call('HSET', KEYS[1], 'lease_until', now + tonumber(ARGV[2]))
  return started(tonumber(r[4]))
end
if status == 'EXECUTING' then
  local lease = tonumber(r[2] or '0')
  if lease > now then return {'busy', lease - now} end
  -- The worker that held the run stopped renewing its lease: it is gone.
  crashes = crashes + 1
  local n = r[4]
  local raw = redis.call('HGET', KEYS[1], 'a:' .. n)
  if raw then
    local rec = cjson.decode(raw)
    rec.s = 'CRASHED'
    rec.t1 = now
    rec.e = 'worker ' .. tostring(r[7]) .. ' stopped renewing its lease (killed or lost)'
    redis.call('HSET', KEYS[1], 'a:' .. n, cjson.encode(rec))
  end
  redis.call('HSET', KEYS[1], 'crashes', crashes, 'lease_until', 0)
  if crashes >= tonumber(ARGV[3]) then
    local reason = 'the worker running this run died ' .. crashes .. ' times; giving up'
    redis.call('HSET', KEYS[1], 'status', 'CRASHED', 'finished_at', now, 'error', reason)
    redis.call('EXPIRE', KEYS[1], ARGV[4])
    redis.call('EXPIRE', KEYS[2], ARGV[4])
    redis.call('EXPIRE', KEYS[3], ARGV[4])
    -- Tell the result() waiters (conveyor/_results.py): the run id on '<namespace>:ended'.
    local ns, id = string.match(KEYS[1], '^([^{]*):{(.*)}:run$')
    redis.call('PUBLISH', ns .. ':ended', id)
    return {'crashed', reason}
  end
  -- Not executing any more: a claim that does not start it now must not count it again.
  redis.call('HSET', KEYS[1], 'status', 'QUEUED')
end
local nb = tonumber(r[3] or '0')
if nb > now then return {'early', nb - now} end
-- Never started and past its ttl: it ends EXPIRED instead (as in expire.lua, the reaper's).
-- A claim sent again after a lost reply finds it ended, and gets the same 'drop'.
if r[13] and r[4] == '0' and now >= tonumber(r[13]) then
  local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl') or '0') / 1000
  local reason = 'not started within its ttl of ' .. ttl .. 's (no worker took it in time)'
  redis.call('HSET', KEYS[1], 'status', 'EXPIRED', 'finished_at', now, 'error', reason)
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
  -- Tell the result() waiters (conveyor/_results.py): the run id on '<namespace>:ended'.
  local ns, id = string.match(KEYS[1], '^([^{]*):{(.*)}:run$')
  redis.call('PUBLISH', ns .. ':ended', id)
  if r[10] then return {'drop', 'EXPIRED', r[10], r[11] or '', '', reason} end
  return {'drop', 'EXPIRED'}
end
-- The last chance (one more crash ends the run) runs alone in its worker, so the crash that
-- ends a run is its own, never that of a poison message it ran beside (worker/admission.py).
if crashes > 0 and crashes >= tonumber(ARGV[3]) - 1 and ARGV[5] ~= '1' then
  return {'alone', crashes}
end
local n = tonumber(r[4] or '0') + 1
redis.call('HDEL', KEYS[1], 'throttle')
redis.call('HSET', KEYS[1], 'status', 'EXECUTING', 'attempt', n, 'worker', ARGV[1],
  'claim', ARGV[6], 'lease_until', now + tonumber(ARGV[2]), 'started_at', r[8] or now,
  'a:' .. n, '{"n":' .. n .. ',"s":"EXECUTING","t0":' .. now .. '}', 'w:' .. n, ARGV[1])
return started(n)
