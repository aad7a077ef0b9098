"""Delete everything a comparison run created: conveyor's namespace (exchanges, delay
ladder, queues and Redis keys), the peers' queues and exchanges, the raw queues. A
failure on one part is reported and does not keep the rest from being deleted."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import aio_pika

from conveyor import Settings
from conveyor.broker.purge import purge_namespace

from . import raw
from .apps.settings import AppSettings
from .systems import ConveyorSystem, System


async def delete_namespace(settings: AppSettings, systems: Sequence[System]) -> None:
    ns = settings.namespace
    try:
        conveyor = Settings.from_env(
            namespace=ns, amqp_url=settings.amqp_url, redis_url=settings.redis_url
        )
        await purge_namespace(conveyor, ConveyorSystem(settings).queues())
    except Exception as exc:
        _warn(f"conveyor's queues and keys of namespace {ns!r} ({exc!r})")
    queues = [raw.raw_queue(settings, t) for t in raw.QUEUE_TYPES]
    exchanges: list[str] = []
    for system in systems:
        if not isinstance(system, ConveyorSystem):
            queues += system.queues()
            exchanges += system.exchanges()
    try:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            for queue in queues:
                await channel.queue_delete(queue)
            for exchange in exchanges:
                await channel.exchange_delete(exchange)
    except Exception as exc:
        _warn(f"the queues {queues} and exchanges {exchanges} ({exc!r})")


def _warn(what: str) -> None:
    print(f"compare: could not delete {what}; delete them by hand", file=sys.stderr)
