"""The delay ladder across a broker crash (issue 7, item 5).

A delayed message reaches its work queue by hopping down the ladder: each level's queue
dead-letters it, on expiry, to the level below. Here the broker is killed (SIGKILL, no
clean shutdown) while 300 messages hop, and started again on the same disk. The quorum
ladder dead-letters at least once: a hop is settled only once the queue below has
confirmed the message, so a crash may repeat a hop (a duplicate, which the worker's claim
absorbs) but never drops one. The classic ladder lost about a quarter of them this way.

The broker is a node of the test's own (tests/servers.py OwnRabbitMQ), never the shared one.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from conveyor import Settings
from conveyor.broker.delay import LEVELS
from conveyor.broker.publisher import Outgoing, Publisher
from conveyor.broker.topology import Names, Topology
from tests.servers import OwnRabbitMQ

# Two node starts (about 5 s each here) and the wait for the messages.
pytestmark = pytest.mark.timeout(150)

COUNT = 300
QUEUE = "crash"
# The delays' hops run from 0.1 s after publishing to 7 s; the kill comes among them.
KILL_AFTER = 1.5
ARRIVAL_TIMEOUT = 60.0
# With the ladder empty this long and nothing new arriving, whatever is missing is lost.
QUIET = 3.0


@pytest.fixture
def rabbit() -> Iterator[OwnRabbitMQ]:
    node = OwnRabbitMQ()
    try:
        node.start()
        yield node
    finally:
        node.close()


async def _publish(settings: Settings, delays: dict[str, int]) -> None:
    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection:
        publisher = Publisher(settings, Topology(settings))
        await publisher.connect(connection)
        await publisher.ensure_queue(QUEUE)
        await publisher.publish(
            [Outgoing(QUEUE, b"{}", message_id=m, delay_ms=d) for m, d in delays.items()]
        )


async def _ladder(channel: aio_pika.abc.AbstractChannel, names: Names) -> int:
    """Messages waiting on the ladder, all levels."""
    waiting = 0
    for level in range(LEVELS):
        queue = await channel.declare_queue(names.delay_level(level), passive=True)
        waiting += queue.declaration_result.message_count or 0
    return waiting


async def _arrivals(settings: Settings, expected: set[str]) -> tuple[Counter[str], int, int]:
    """Consume the work queue until every expected message has arrived, or the ladder has
    been empty for QUIET seconds with nothing arriving, or ARRIVAL_TIMEOUT: (deliveries by
    message id, messages left on the ladder, messages dead-lettered)."""
    names = Names(settings.namespace)
    arrived: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    last_arrival = loop.time()

    async def consume(message: AbstractIncomingMessage) -> None:
        nonlocal last_arrival
        arrived[message.message_id or ""] += 1
        last_arrival = loop.time()

    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        # Declared again as the publisher did, which also shows the queues came back.
        work = await Topology(settings).declare_queue(channel, QUEUE)
        await work.consume(consume, no_ack=True)
        deadline = loop.time() + ARRIVAL_TIMEOUT
        while loop.time() < deadline and not expected <= arrived.keys():
            await asyncio.sleep(0.5)
            if await _ladder(channel, names) == 0 and loop.time() - last_arrival > QUIET:
                break
        # A hop repeated by the crash may still be on its way (at least once): a moment
        # for it to land, so the ladder's count below is what stays there.
        for _ in range(10):
            if (left := await _ladder(channel, names)) == 0:
                break
            await asyncio.sleep(0.5)
        dead = await channel.declare_queue(names.dead, passive=True)
        return arrived, left, dead.declaration_result.message_count or 0


async def test_a_broker_crash_while_messages_hop_down_the_ladder_loses_none(
    rabbit: OwnRabbitMQ,
) -> None:
    settings = Settings(amqp_url=rabbit.url, namespace="crash", publish_timeout=10.0)
    rng = random.Random(11)
    delays = {f"m{i}": rng.randint(1000, 7000) for i in range(COUNT)}
    loop = asyncio.get_running_loop()
    began = loop.time()
    await _publish(settings, delays)
    published_in = loop.time() - began
    await asyncio.sleep(began + KILL_AFTER - loop.time())

    await asyncio.to_thread(rabbit.kill)
    await asyncio.to_thread(rabbit.start)
    arrived, left, dead = await _arrivals(settings, set(delays))

    missing = set(delays) - arrived.keys()
    duplicates = sum(arrived.values()) - len(arrived)
    # Shown with -s or on failure: the figures docs/reliability.md quotes.
    print(
        f"published {COUNT} in {published_in:.2f} s, killed at {KILL_AFTER} s, restarted "
        f"in {rabbit.started_in:.1f} s: {len(arrived)} arrived, {len(missing)} lost, "
        f"{duplicates} duplicates, {left} left on the ladder, {dead} dead-lettered"
    )
    assert not missing, f"{len(missing)} of {COUNT} delayed messages lost in the crash"
    assert arrived.keys() == set(delays), "a message arrived that was never published"
    assert left == 0, f"{left} messages still on the ladder after all arrived"
    assert dead == 0, f"{dead} messages dead-lettered"
