-- Create runs of one task, or return the existing run of a live idempotency key.
-- KEYS: runs index bucket, the task's bucket (shared/runs_index.py), due index, then per run:
--       run, idempotency (or the run key again when unused, or checked before: on a Redis
--       Cluster, shared/cluster_create.py, where the first three are the run key too and
--       the index and due entries are written apart)
-- ARGV: task, queue, tags, delay_ms, idem_ttl_ms, parent run ('' for none), root run,
--       scheduled_at (epoch ms of the cron tick that makes the runs, 0: none),
--       concurrency key ('' for none),
--       ttl_ms (0: none; the run ends EXPIRED if not started ttl_ms after its delay),
--       ttl_from (epoch ms the ttl counts from instead, 0: none; a wire message's not_before),
--       trace context ('' for none), epoch ms at which the index buckets expire ('': the
--       index and the due entry are not written here), created_at (epoch ms, '': now on
--       Redis's clock; a cluster's client passes the time it indexed the run at),
--       then per run: run_id, payload, idem_key, parent step
-- Returns per run: 1 and its id (created), 2 and its id (it was there already), or 0 and
-- the id of the run its idempotency key belongs to.
-- A child run (with a parent) records its parent, the parent's step waiting for it (if any)
-- and the root of its tree.
-- Each new run enters the due index at the time it should start by: the reaper republishes
-- it if nothing has moved it some time after that (scheduler/reaper.py), and both
-- index buckets scored by its creation time.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local task, queue, tags, delay, idem_ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local parent, root, scheduled, ckey = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local ttl = tonumber(ARGV[10])
local trace, index_expires = ARGV[12], ARGV[13]
local created = now
if ARGV[14] ~= '' then created = tonumber(ARGV[14]) end
local expires = created + delay + ttl
if ARGV[11] ~= '0' then expires = tonumber(ARGV[11]) + ttl end
local status = 'QUEUED'
if delay > 0 then status = 'DELAYED' end
local out, indexed = {}, {}
for i = 1, (#KEYS - 3) / 2 do
  local run_key, idem_key = KEYS[2 * i + 2], KEYS[2 * i + 3]
  local run_id, payload, idem = ARGV[4 * i + 11], ARGV[4 * i + 12], ARGV[4 * i + 13]
  local existing = false
  if idem ~= '' and idem_key ~= run_key then
    existing = redis.call('GET', idem_key)
    if not existing then redis.call('SET', idem_key, run_id, 'PX', idem_ttl) end
    -- A create retried after its reply was lost finds its own run: that is a create.
    if existing == run_id then existing = false end
  end
  if existing then
    out[#out + 1] = 0
    out[#out + 1] = existing
  else
    -- A worker that got the message first has created the run already (see Client._trigger).
    local code = 2
    if redis.call('EXISTS', run_key) == 0 then
      code = 1
      if delay > 0 then redis.call('HSET', run_key, 'not_before', now + delay) end
      if scheduled ~= '0' then redis.call('HSET', run_key, 'scheduled_at', scheduled) end
      if ckey ~= '' then redis.call('HSET', run_key, 'ckey', ckey) end
      if ttl > 0 then redis.call('HSET', run_key, 'expires_at', expires, 'ttl', ttl) end
      if trace ~= '' then redis.call('HSET', run_key, 'trace', trace) end
      redis.call('HSET', run_key, 'task', task, 'queue', queue, 'status', status,
        'payload', payload, 'tags', tags, 'idem', idem, 'created_at', created,
        'attempt', 0, 'failures', 0, 'crashes', 0)
      if parent ~= '' then
        redis.call('HSET', run_key, 'parent', parent, 'root', root)
        if ARGV[4 * i + 14] ~= '' then redis.call('HSET', run_key, 'parent_step', ARGV[4 * i + 14]) end
      end
      indexed[#indexed + 1] = created
      indexed[#indexed + 1] = run_id
      if index_expires ~= '' then redis.call('ZADD', KEYS[3], now + delay, run_id) end
    end
    out[#out + 1] = code
    out[#out + 1] = run_id
  end
end
if #indexed > 0 and index_expires ~= '' then
  for k = 1, 2 do
    redis.call('ZADD', KEYS[k], unpack(indexed))
    redis.call('PEXPIREAT', KEYS[k], index_expires)
  end
end
return out
