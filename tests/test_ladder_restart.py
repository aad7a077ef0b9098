"""The delay ladder across a broker restart (issue 7, item 5).

Runs wait on the ladder (`delay=`, retry backoff) and come due while RabbitMQ is stopped.
On the classic ladder, the messages that expired during the outage were dead-lettered
into the work queue on start-up before its quorum leader was elected and dropped
("leader not known ... Command is dropped"), leaving their runs DELAYED or RETRYING for
ever. The quorum ladder dead-letters at least once: RabbitMQ retries the hop until the
queue below confirms it, so every run arrives, and each executes once.

A hop that the broker could not deliver at once while it recovered its queues (the
target's quorum leader not elected yet) is sent again by RabbitMQ only after
`dead_letter_worker_publisher_confirm_timeout`, 180 s by default: late, not lost. The
tests lower it to 5 s for their restarts (docs/architecture.md, "Known limits", says so
to operators), so that a late hop is told from a lost one within the test's wait.

The broker is shared with tests running beside this one: it is down only for about 6 s,
and always started again.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from conveyor import Client, RunHandle, RunStatus, Settings
from conveyor.broker.topology import Names
from tests import tasks
from tests.conftest import eventually
from tests.faults import drained, queue_counts, trace, wait_for_consumers
from tests.test_broker_restart import rabbitmqctl
from tests.test_long_runs import restore_envs, set_envs

pytestmark = pytest.mark.serial


@pytest.fixture(autouse=True)
def quick_dead_letter_resends() -> Iterator[None]:
    old = set_envs({"dead_letter_worker_publisher_confirm_timeout": "5000"})
    try:
        yield
    finally:
        restore_envs(old)


OUTAGE = 6.0


async def _outage() -> None:
    try:
        await asyncio.to_thread(rabbitmqctl, "stop_app")
        await asyncio.sleep(OUTAGE)
    finally:
        await asyncio.to_thread(rabbitmqctl, "start_app")
        await asyncio.to_thread(rabbitmqctl, "await_startup")


async def _statuses(client: Client, handles: list[RunHandle[Any]], timeout: float) -> Counter[str]:
    """Wait (up to `timeout`) for every run to end; the count of each run status."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        runs = [await client.get_run(h.id) for h in handles]
        counts = Counter(r.status.value for r in runs)
        if counts[RunStatus.COMPLETED.value] == len(handles) or loop.time() > deadline:
            return counts
        await asyncio.sleep(0.5)


async def _nothing_dead(settings: Settings) -> None:
    dead = Names(settings.namespace).dead
    assert (await queue_counts(settings, [dead]))[dead][0] == 0


async def test_delayed_runs_due_while_the_broker_is_down_all_complete_once(
    settings: Settings, client: Client, spawn_worker: Any
) -> None:
    spawn_worker("--concurrency", "20")
    await wait_for_consumers(settings, tasks.echo.queue, 1)
    rng = random.Random(7)
    delays = [rng.uniform(2.0, 6.0) for _ in range(100)]
    handles = await asyncio.gather(
        *(tasks.echo.options(delay=d).trigger(f"r{i}") for i, d in enumerate(delays))
    )

    # Every delay comes due while the broker is down (it stops within the first 2 s).
    await _outage()

    counts = await _statuses(client, handles, timeout=60)
    assert counts == {"COMPLETED": 100}, f"runs by status after the restart: {dict(counts)}"
    for i, handle in enumerate(handles):
        run = await client.get_run(handle.id)
        assert [a.status for a in run.attempts] == ["COMPLETED"], run.id
        assert run.output == f"r{i}"
    assert await drained(settings, [tasks.echo.queue])
    await _nothing_dead(settings)


async def test_retries_due_while_the_broker_is_down_all_complete_once(
    settings: Settings, client: Client, spawn_worker: Any
) -> None:
    spawn_worker("--concurrency", "20")
    await wait_for_consumers(settings, tasks.late_retry.queue, 1)
    handles = await asyncio.gather(*(tasks.late_retry.trigger(i) for i in range(100)))

    async def all_retrying() -> bool:
        runs = [await client.get_run(h.id) for h in handles]
        return all(r.status is RunStatus.RETRYING for r in runs)

    # Their first attempts failed; the retries wait 3.2 s on the ladder, due in the outage.
    await eventually(all_retrying, timeout=10)
    await _outage()

    counts = await _statuses(client, handles, timeout=60)
    assert counts == {"COMPLETED": 100}, f"runs by status after the restart: {dict(counts)}"
    for i, handle in enumerate(handles):
        run = await client.get_run(handle.id)
        assert [a.status for a in run.attempts] == ["FAILED", "COMPLETED"], run.id
        assert run.output == i
        assert await trace(settings, handle.id) == ["late-retry@1", "late-retry@2"]
    assert await drained(settings, [tasks.late_retry.queue])
    await _nothing_dead(settings)
