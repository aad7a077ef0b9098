"""Acks leave the worker in batches, one write per loop turn (worker/delivery.py): every
finished run's message must still be acked on the broker, the last ones before the
connection closes at shutdown."""

from __future__ import annotations

import asyncio

from conveyor import Client, RunStatus, Settings
from conveyor.broker.topology import Names
from conveyor.worker import Worker
from conveyor.worker.delivery import Acks
from tests import tasks
from tests.faults import queue_counts


async def test_every_finished_run_is_acked_before_shutdown_closes(
    settings: Settings, client: Client
) -> None:
    worker = Worker([tasks.noop], settings=settings, concurrency=50)
    await worker.start()
    try:
        handles = await tasks.noop.batch_trigger([{}] * 300)
        for handle in handles:
            await handle.result(timeout=30)
    finally:
        await worker.shutdown()
    # Closing the connection puts every unacked message back in the queue.
    queue = Names(settings.namespace).queue(tasks.noop.queue)
    assert (await queue_counts(settings, [queue]))[queue] == (0, 0)
    runs = [await client.get_run(h.id) for h in handles]
    assert all(r.status is RunStatus.COMPLETED and len(r.attempts) == 1 for r in runs)


class _Channel:
    """Records the acks an aiormq channel would send."""

    def __init__(self) -> None:
        self.is_closed = False
        self.sent: list[tuple[int, bool]] = []

    async def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.sent.append((tag, multiple))

    async def basic_nack(self, tag: int, requeue: bool = True) -> None:
        self.sent.append((-tag, False))


async def _settled(acks: Acks) -> None:
    await asyncio.sleep(0)  # the loop turn ends: the batch is decided
    await acks.written(timeout=1)


async def test_acks_below_the_oldest_unsettled_delivery_go_as_one_multiple_ack() -> None:
    acks, channel = Acks(), _Channel()
    for tag in range(1, 8):
        acks.received(channel, tag)  # type: ignore[arg-type]
    for tag in (1, 2, 4, 6):
        acks.ack(channel, tag)  # type: ignore[arg-type]
    await _settled(acks)
    # 3 is still running: 1 and 2 in one ack, 4 and 6 on their own.
    assert channel.sent == [(2, True), (4, False), (6, False)]
    channel.sent.clear()
    await acks.nack(channel, 3, requeue=True)  # type: ignore[arg-type]
    acks.ack(channel, 5)  # type: ignore[arg-type]
    await _settled(acks)
    # Everything up to 6 is settled now; 5 is the highest acked: it covers 1..5 (4 and
    # 3 are settled already, which a multiple ack leaves alone).
    assert channel.sent == [(-3, False), (5, True)]
    channel.sent.clear()
    acks.ack(channel, 7)  # type: ignore[arg-type]
    await _settled(acks)
    assert channel.sent == [(7, True)]


async def test_after_a_skipped_tag_every_ack_goes_on_its_own() -> None:
    acks, channel = Acks(), _Channel()
    for tag in (1, 2, 4):  # 3 never reached the worker: a multiple ack must not cover it
        acks.received(channel, tag)  # type: ignore[arg-type]
    for tag in (1, 2, 4):
        acks.ack(channel, tag)  # type: ignore[arg-type]
    await _settled(acks)
    assert channel.sent == [(1, False), (2, False), (4, False)]


async def test_acks_on_a_closed_channel_are_dropped() -> None:
    acks, channel = Acks(), _Channel()
    acks.received(channel, 1)  # type: ignore[arg-type]
    channel.is_closed = True
    acks.ack(channel, 1)  # type: ignore[arg-type]
    await _settled(acks)
    assert channel.sent == []
