"""Graceful shutdown on SIGTERM (issue item 12).

The worker stops consuming, lets running attempts finish within the grace period
(CONVEYOR_SHUTDOWN_GRACE), hands back what is still running after it (attempt
INTERRUPTED, message requeued), returns prefetched messages it has not started, and
exits 0. Another worker then completes every run: nothing is lost, nothing runs twice.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from conveyor import Client, RunStatus, Settings
from conveyor.broker.topology import Names
from tests import tasks
from tests.conftest import eventually
from tests.faults import drained, queue_counts, trace, wait_for_consumers


async def started(settings: Settings, run_ids: list[str], event: str) -> list[str]:
    return [i for i in run_ids if event in await trace(settings, i)]


async def test_sigterm_finishes_running_returns_prefetched_and_loses_nothing(
    settings: Settings, client: Client, spawn_worker: Any
) -> None:
    # A worker prefetches as many messages as it runs at once, so its prefetched messages
    # are all running; after a hand-over acks a running message, the broker sends one more,
    # which waits for a slot. A quick hand-over makes such prefetched, unstarted messages
    # here. With a lease of 4 s the hand-over comes 1.3 to 2.7 s into the 5 s runs and the
    # watchdog copies 4 s after it, which leaves the test seconds to look and send SIGTERM.
    first = spawn_worker(
        "--concurrency",
        "2",
        env={"CONVEYOR_HANDOVER_AFTER": "0.5", "CONVEYOR_LEASE_TTL": "4"},
    )
    await wait_for_consumers(settings, tasks.sleeper.queue, 1)
    handles = await tasks.sleeper.batch_trigger([{"seconds": 5.0}] * 6)
    ids = [h.id for h in handles]
    work_queue = Names(settings.namespace).queue(tasks.sleeper.queue)

    async def two_running_two_prefetched() -> bool:
        ready, _ = (await queue_counts(settings, [work_queue]))[work_queue]
        return ready == 2 and len(await started(settings, ids, "sleeper:start@1")) == 2

    await eventually(two_running_two_prefetched, timeout=15, interval=0.1)
    running = await started(settings, ids, "sleeper:start@1")
    first.kill(signal.SIGTERM)
    assert await asyncio.to_thread(first.wait, 20) == 0

    # The running attempts finished inside the grace period; nothing else was started.
    for run_id in ids:
        run = await client.get_run(run_id)
        if run_id in running:
            assert run.status is RunStatus.COMPLETED
            assert [a.status for a in run.attempts] == ["COMPLETED"]
        else:
            assert run.status is RunStatus.QUEUED
            assert run.attempts == []
            assert await trace(settings, run_id) == []

    spawn_worker("--concurrency", "4")
    results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
    assert results == ["slept"] * 6
    for run_id in ids:
        run = await client.get_run(run_id)
        assert [a.status for a in run.attempts] == ["COMPLETED"]
        assert await trace(settings, run_id) == ["sleeper:start@1", "sleeper:end@1"]
    # The hand-overs' watchdog copies find their runs ended and are dropped.
    await eventually(lambda: drained(settings, [tasks.sleeper.queue]), timeout=15, interval=0.3)


async def test_run_longer_than_grace_is_handed_back_and_completed_elsewhere(
    settings: Settings, client: Client, spawn_worker: Any
) -> None:
    first = spawn_worker(env={"CONVEYOR_SHUTDOWN_GRACE": "1"})
    handle = await tasks.three_steps.trigger(seconds=5.0)

    async def in_step_two() -> bool:
        return "s2:start@1" in await trace(settings, handle.id)

    await eventually(in_step_two, timeout=15)
    first.kill(signal.SIGTERM)
    spawn_worker()
    assert await asyncio.to_thread(first.wait, 20) == 0

    assert await handle.result(timeout=30) == ["s1", "s2", "s3"]
    run = await client.get_run(handle.id)
    # The first worker did not wait for step 2 to end, only for the grace period.
    assert [a.status for a in run.attempts] == ["INTERRUPTED", "COMPLETED"]
    assert run.attempts[0].error and "shut down" in run.attempts[0].error
    assert run.attempts[0].worker != run.attempts[1].worker
    # Step 1 was checkpointed and not run again; step 2 was cut short and ran again.
    assert await trace(settings, handle.id) == [
        "s1:start@1",
        "s1:end@1",
        "s2:start@1",
        "s2:start@2",
        "s2:end@2",
        "s3:start@2",
        "s3:end@2",
    ]
    await eventually(lambda: drained(settings, [tasks.three_steps.queue]), timeout=10, interval=0.3)
