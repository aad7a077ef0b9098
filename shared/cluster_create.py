"""Creating a run on a Redis Cluster, where create.lua may touch only the run's own slot.

On one Redis, create.lua writes a batch of runs, their idempotency keys, the runs index
and the due index in one call. On a cluster those keys live in different slots, so a run
is created in up to three steps, each batched with the other creates of the loop turn:

1. its idempotency key, if it has one, is claimed (idem_claim.lua) and names the run that
   stands for the key: this one, or the one an earlier trigger claimed it for;
2. that run enters the due index and the index buckets (ZADD NX, scored by this client's
   clock), before it exists, so that a run never exists without its due entry: the
   reaper drops an entry whose run never came;
3. create.lua makes the run if it does not exist yet. A trigger that found the key taken
   makes the key's run itself when the trigger that claimed the key died before step 3:
   the key's run then exists with this trigger's arguments, and this trigger publishes it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .batcher import Arg, CommandBatcher
from .keys import Keys
from .runs_index import index_write
from .scripts import Scripts
from .settings import Settings


async def create_in_cluster(
    scripts: Scripts,
    batcher: CommandBatcher,
    keys: Keys,
    settings: Settings,
    head: list[Arg],
    run_id: str,
    task_id: str,
    delay_ms: int,
    per_run: list[Arg],
) -> list[Any]:
    """create.lua's reply ([code, run id]) for one run. `head` is create.lua's arguments
    before the runs but the index expiry and created_at; `per_run` the run's payload,
    idempotency key and parent step."""
    idem = str(per_run[1])
    owner = run_id
    if idem:
        claimed = await scripts.call(
            "idem_claim",
            [keys.idempotency(task_id, idem)],
            [run_id, str(int(settings.idempotency_ttl * 1000))],
        )
        owner = claimed.decode()
    now = int(time.time() * 1000)
    index = index_write(keys, settings, task_id)
    await asyncio.gather(
        batcher.execute("ZADD", keys.due, "NX", now + delay_ms, owner),
        batcher.execute("ZADD", index.bucket, "NX", now, owner),
        batcher.execute("PEXPIREAT", index.bucket, index.expires_ms),
        batcher.execute("ZADD", index.task_bucket, "NX", now, owner),
        batcher.execute("PEXPIREAT", index.task_bucket, index.expires_ms),
    )
    run_key = keys.run(owner)
    reply: list[Any] = await scripts.call(
        "create", [run_key] * 5, [*head, "", now, owner, *per_run]
    )
    if owner != run_id and reply[0] == 2:
        reply[0] = 0  # the key's run, made by the trigger that claimed the key
    return reply
