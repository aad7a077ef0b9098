"""Crash recovery with real worker processes killed by SIGKILL (issue item 4).

A killed worker leaves its message unacked; RabbitMQ hands it to another worker, which
waits (through the delay ladder) until the dead worker's lease runs out and then resumes
the run from its checkpoints.
"""

from __future__ import annotations

import asyncio
from typing import Any

from conveyor import Client, RunStatus, Settings
from tests import tasks
from tests.conftest import eventually
from tests.faults import (
    KILL_AFTER_FINISH,
    drained,
    drop_traces,
    pid_of,
    trace,
    wait_for_consumers,
)

STEPS = ["s1:start", "s1:end", "s2:start", "s2:end", "s3:start", "s3:end"]


async def _wait_exit(proc: Any, timeout: float = 10.0) -> int:
    return int(await asyncio.to_thread(proc.wait, timeout))


async def test_sigkill_in_step_two_resumes_on_the_other_worker(
    client: Client, settings: Settings, spawn_worker: Any
) -> None:
    workers = [spawn_worker(), spawn_worker()]
    await wait_for_consumers(settings, "three-steps", 2)
    handle = await tasks.three_steps.trigger(seconds=1.5)
    try:

        async def step_two_started() -> bool:
            return "s2:start@1" in await trace(settings, handle.id)

        await eventually(step_two_started, timeout=20)
        first = (await client.get_run(handle.id)).attempts[-1]
        [victim] = [w for w in workers if w.proc.pid == pid_of(first.worker)]
        [survivor] = [w for w in workers if w is not victim]
        victim.kill()
        assert await _wait_exit(victim.proc) == -9

        assert await handle.result(timeout=25) == ["s1", "s2", "s3"]
        events = await trace(settings, handle.id)
        assert events == [
            "s1:start@1",
            "s1:end@1",
            "s2:start@1",  # killed here
            "s2:start@2",
            "s2:end@2",
            "s3:start@2",
            "s3:end@2",
        ]
        run = await client.get_run(handle.id)
        assert run.status is RunStatus.COMPLETED
        assert [a.status for a in run.attempts] == ["CRASHED", "COMPLETED"]
        assert "stopped renewing its lease" in (run.attempts[0].error or "")
        assert pid_of(run.attempts[1].worker) == survivor.proc.pid
        assert survivor.proc.poll() is None
        # Nothing is left to deliver: the run cannot complete a second time.
        await eventually(lambda: drained(settings, ["three-steps"]), timeout=10)
        assert len((await client.get_run(handle.id)).attempts) == 2
    finally:
        await drop_traces(settings, handle.id)


async def test_sigkill_after_last_checkpoint_replays_no_step(
    client: Client, settings: Settings, spawn_worker: Any
) -> None:
    spawn_worker()
    spawn_worker()
    await wait_for_consumers(settings, "crash-after-steps", 2)
    handle = await tasks.crash_after_steps.trigger()
    try:
        assert await handle.result(timeout=25) == ["s1", "s2", "s3"]
        events = await trace(settings, handle.id)
        # Every step ran once, in attempt 1; attempt 2 only replayed the body from checkpoints.
        assert events == [f"{e}@1" for e in STEPS] + ["body-end@1", "body-end@2"]
        run = await client.get_run(handle.id)
        assert [a.status for a in run.attempts] == ["CRASHED", "COMPLETED"]
        assert len(run.steps) == 3
        await eventually(lambda: drained(settings, ["crash-after-steps"]), timeout=10)
        assert len((await client.get_run(handle.id)).attempts) == 2
    finally:
        await drop_traces(settings, handle.id)


async def test_sigkill_after_outcome_before_ack_is_dropped_on_redelivery(
    client: Client, settings: Settings, spawn_worker: Any
) -> None:
    # This worker dies right after writing COMPLETED, before acking the message.
    doomed = spawn_worker("tests.faults", env={KILL_AFTER_FINISH: "1"})
    await wait_for_consumers(settings, "three-steps", 1)
    handle = await tasks.three_steps.trigger(seconds=0.01)
    try:
        assert await handle.result(timeout=20) == ["s1", "s2", "s3"]
        assert await _wait_exit(doomed.proc) == -9
        # The unacked message went back to the queue; a healthy worker takes it and drops it.
        spawn_worker()
        await wait_for_consumers(settings, "three-steps", 1)
        await eventually(lambda: drained(settings, ["three-steps"]), timeout=20)
        run = await client.get_run(handle.id)
        assert run.status is RunStatus.COMPLETED
        assert [a.status for a in run.attempts] == ["COMPLETED"]
        assert await trace(settings, handle.id) == [f"{e}@1" for e in STEPS]
    finally:
        await drop_traces(settings, handle.id)
