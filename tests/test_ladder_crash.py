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
from collections.abc import Iterator

import pytest

from conveyor import Settings
from tests.ladder import arrivals, publish_delayed
from tests.servers import OwnRabbitMQ

# Two node starts (about 5 s each here) and the wait for the messages.
pytestmark = pytest.mark.timeout(150)

COUNT = 300
# The delays' hops run from 0.1 s after publishing to 7 s; the kill comes among them.
KILL_AFTER = 1.5


@pytest.fixture
def rabbit() -> Iterator[OwnRabbitMQ]:
    node = OwnRabbitMQ()
    try:
        node.start()
        yield node
    finally:
        node.close()


async def test_a_broker_crash_while_messages_hop_down_the_ladder_loses_none(
    rabbit: OwnRabbitMQ,
) -> None:
    settings = Settings(amqp_url=rabbit.url, namespace="crash", publish_timeout=10.0)
    rng = random.Random(11)
    delays = {f"m{i}": rng.randint(1000, 7000) for i in range(COUNT)}
    loop = asyncio.get_running_loop()
    began = loop.time()
    await publish_delayed(settings, delays)
    published_in = loop.time() - began
    await asyncio.sleep(began + KILL_AFTER - loop.time())

    await asyncio.to_thread(rabbit.kill)
    await asyncio.to_thread(rabbit.start)
    arrived, left, dead = await arrivals(settings, set(delays))

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
