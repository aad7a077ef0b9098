"""Upgrading a namespace from the classic delay ladder (issue 7, item 5).

Earlier versions declared the ladder as classic queues `{ns}.delay.{L}`; RabbitMQ refuses
to re-declare a queue with other arguments, so the quorum ladder has names of its own
(`{ns}.ladder.{L}`). The classic levels stay wired as they were: what waits there when
the new version starts still arrives, through the classic levels below and the delivery
exchange both ladders share, and nothing new enters them.
"""

from __future__ import annotations

import aio_pika
import msgspec

from conveyor import Client, Run, RunNotFound, RunStatus, Settings
from conveyor.broker.delay import LEVELS, UNIT_MS, delay_routing_key, level_bindings
from conveyor.broker.topology import Names
from conveyor.shared.ids import new_run_id
from conveyor.worker import Worker
from tests import tasks
from tests.conftest import eventually
from tests.faults import queue_counts


async def _declare_classic_ladder(channel: aio_pika.abc.AbstractChannel, names: Names) -> None:
    """The ladder as the previous version declared it."""
    below = await channel.declare_exchange(
        names.delay_deliver, aio_pika.ExchangeType.TOPIC, durable=True
    )
    for level in range(LEVELS):
        name = names.classic_delay_level(level)
        exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(
            name,
            durable=True,
            arguments={"x-message-ttl": UNIT_MS * 2**level, "x-dead-letter-exchange": below.name},
        )
        to_queue, onwards = level_bindings(level)
        await queue.bind(exchange, to_queue)
        await below.bind(exchange, onwards)
        below = exchange


async def test_a_classic_ladder_namespace_upgrades_and_its_waiting_messages_arrive(
    settings: Settings, client: Client
) -> None:
    names = Names(settings.namespace)
    waiting = new_run_id()
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await _declare_classic_ladder(channel, names)
        # A run of the old version on its way round the classic ladder (levels 3 and 1, the
        # message is in level 3's queue): a wire trigger, so no Redis state is needed.
        body = msgspec.json.encode({"task": "echo", "payload": {"value": "old"}, "id": waiting})
        entry = await channel.get_exchange(names.classic_delay_level(LEVELS - 1), ensure=False)
        await entry.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            delay_routing_key(1000, tasks.echo.queue),
            mandatory=True,
        )
        old_level = names.classic_delay_level(3)
        assert (await queue_counts(settings, [old_level]))[old_level][0] == 1

    # The new version declares its topology beside the old one without an error.
    worker = Worker(tasks.ALL, settings=settings, concurrency=5)
    await worker.start()
    try:
        fresh = await tasks.echo.options(delay=0.3).trigger("new")
        assert await fresh.result(timeout=10) == "new"

        async def old_run_completed() -> Run | None:
            try:
                run = await client.get_run(waiting)  # the worker created it from the message
            except RunNotFound:
                return None
            return run if run.status is RunStatus.COMPLETED else None

        old_run = await eventually(old_run_completed, timeout=10)
        assert old_run.output == "old"
        assert [a.status for a in old_run.attempts] == ["COMPLETED"]

        # A new delay goes round the quorum ladder only: 60 s = 0b1001011000 units waits
        # first in level 9.
        later = await tasks.echo.options(delay=60).trigger("later")
        levels = [names.delay_level(9), names.classic_delay_level(9)]
        assert {q: n for q, (n, _) in (await queue_counts(settings, levels)).items()} == {
            names.delay_level(9): 1,
            names.classic_delay_level(9): 0,
        }
        await client.cancel(later.id)
    finally:
        await worker.shutdown()
    classic = [names.classic_delay_level(level) for level in range(LEVELS)]
    assert sum(ready for ready, _ in (await queue_counts(settings, classic)).values()) == 0
