"""Delayed messages sent down the delay ladder and counted as they arrive, for the tests
that break a broker while they hop (tests/test_ladder_crash.py, test_ladder_cluster.py)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import suppress

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import AMQPError

from conveyor import Settings
from conveyor.broker.delay import LEVELS
from conveyor.broker.publisher import Outgoing, Publisher
from conveyor.broker.topology import Names, Topology

QUEUE = "crash"
ARRIVAL_TIMEOUT = 60.0
# With the ladder empty this long and nothing new arriving, whatever is missing is lost.
QUIET = 3.0


async def publish_delayed(settings: Settings, delays: dict[str, int]) -> None:
    """Publish one empty message per id into the ladder, with its delay in ms."""
    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection:
        publisher = Publisher(settings, Topology(settings))
        await publisher.connect(connection)
        await publisher.ensure_queue(QUEUE)
        await publisher.publish(
            [Outgoing(QUEUE, b"{}", message_id=m, delay_ms=d) for m, d in delays.items()]
        )


async def on_ladder(channel: aio_pika.abc.AbstractChannel, names: Names) -> int:
    """Messages waiting on the ladder, all levels."""
    waiting = 0
    for level in range(LEVELS):
        queue = await channel.declare_queue(names.delay_level(level), passive=True)
        waiting += queue.declaration_result.message_count or 0
    return waiting


async def _consuming(
    settings: Settings, consume: Callable[[AbstractIncomingMessage], Awaitable[None]]
) -> AbstractConnection:
    """A connection consuming the work queue. Just after a broker (re)start RabbitMQ 3.10
    may refuse basic.consume with INTERNAL_ERROR while the queue's leader is being
    elected: tried again for a while."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        connection: AbstractConnection | None = None
        try:
            connection = await aio_pika.connect(settings.amqp_url)
            channel = await connection.channel()
            # Declared again as the publisher did, which also shows the queues came back.
            work = await Topology(settings).declare_queue(channel, QUEUE)
            await work.consume(consume, no_ack=True)
            return connection
        except (AMQPError, OSError):
            if connection is not None:
                # Closing a connection the broker already closed raises its reason again.
                with suppress(AMQPError, OSError):
                    await connection.close()
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


async def arrivals(
    settings: Settings, expected: set[str], *, quiet: float = QUIET
) -> tuple[Counter[str], int, int]:
    """Consume the work queue until every expected message has arrived, or the ladder has
    been empty for `quiet` seconds with nothing arriving, or ARRIVAL_TIMEOUT: (deliveries by
    message id, messages left on the ladder, messages dead-lettered)."""
    names = Names(settings.namespace)
    arrived: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    last_arrival = loop.time()

    async def consume(message: AbstractIncomingMessage) -> None:
        nonlocal last_arrival
        arrived[message.message_id or ""] += 1
        last_arrival = loop.time()

    connection = await _consuming(settings, consume)
    async with connection:
        channel = await connection.channel()
        deadline = loop.time() + ARRIVAL_TIMEOUT
        while loop.time() < deadline and not expected <= arrived.keys():
            await asyncio.sleep(0.5)
            if await on_ladder(channel, names) == 0 and loop.time() - last_arrival > quiet:
                break
        # A hop repeated by the crash may still be on its way (at least once): a moment
        # for it to land, so the ladder's count below is what stays there.
        for _ in range(10):
            if (left := await on_ladder(channel, names)) == 0:
                break
            await asyncio.sleep(0.5)
        dead = await channel.declare_queue(names.dead, passive=True)
        return arrived, left, dead.declaration_result.message_count or 0
