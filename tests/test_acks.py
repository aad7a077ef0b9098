"""Acks leave the worker in batches, one write per loop turn (worker/delivery.py): every
finished run's message must still be acked on the broker, the last ones before the
connection closes at shutdown."""

from __future__ import annotations

from conveyor import Client, RunStatus, Settings
from conveyor.broker.topology import Names
from conveyor.worker import Worker
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
