"""Remove everything one namespace holds in RabbitMQ and Redis.

For tests, demos and tear-down tools that work in a namespace of their own. Work queues
are named after task queues, which RabbitMQ cannot list without its management plugin, so
the caller names them; the queues recorded in the namespace's runs are added.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import ChannelNotFoundEntity

from conveyor.shared.keys import Keys
from conveyor.shared.redis_client import Redis, redis_client
from conveyor.shared.settings import Settings

from .topology import Names, Topology


async def purge_namespace(settings: Settings, queues: Iterable[str] = ()) -> None:
    """Delete the namespace's exchanges, delay ladder (and the classic ladder of earlier
    versions, if it is there), dead-letter queue, the given work queues and those its
    runs name, then every Redis key of the namespace."""
    keys = Keys(settings.namespace)
    r = redis_client(settings)
    try:
        names = set(queues) | await _queues_of_runs(r, keys)
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            topology = Topology(settings)
            await topology.delete(channel, sorted(names))
            if await _has_classic_ladder(connection, topology.names):
                await topology.delete_classic_ladder(channel)
        doomed = [k async for k in r.scan_iter(match=keys.pattern(), count=1000)]
        for start in range(0, len(doomed), 1000):
            await r.delete(*doomed[start : start + 1000])
    finally:
        await r.aclose()


async def _has_classic_ladder(connection: AbstractConnection, names: Names) -> bool:
    # Looked up first: deleting the 48 names one by one costs more than this look-up,
    # and only namespaces upgraded from the classic ladder have them.
    probe = await connection.channel()
    try:
        await probe.declare_queue(names.classic_delay_level(0), passive=True)
    except ChannelNotFoundEntity:
        return False  # the broker closed the probe channel
    await probe.close()
    return True


async def _queues_of_runs(r: Redis, keys: Keys) -> set[str]:
    found: set[str] = set()
    run_keys = [k async for k in r.scan_iter(match=keys.run("*"), count=1000)]
    if not run_keys:
        return found
    async with r.pipeline(transaction=False) as pipe:
        for key in run_keys:
            pipe.hget(key, "queue")
        replies: list[Any] = await pipe.execute()
    found.update(q.decode() for q in replies if q)
    return found
