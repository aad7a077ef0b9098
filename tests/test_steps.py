"""Attempts and checkpointed steps (issue items 1 and 2), with the in-process worker."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from conveyor import (
    Client,
    ConveyorError,
    Retry,
    RunFailed,
    RunStatus,
    current_run,
    run_step,
    step,
)
from conveyor.shared.redis_client import redis_client
from conveyor.worker import Worker
from tests import tasks
from tests.conftest import eventually


@pytest.fixture
async def r(client: Client) -> Any:
    conn = redis_client(client.settings)
    yield conn
    await conn.aclose()


async def trace(r: aioredis.Redis, run_id: str) -> list[str]:
    return [t.decode() for t in await r.lrange(tasks.trace_key(run_id), 0, -1)]


async def checkpoints(client: Client, r: aioredis.Redis, run_id: str) -> dict[str, bytes]:
    raw = await r.hgetall(client.store.keys.steps(run_id))
    return {k.decode(): v for k, v in raw.items()}


# -- run states and attempts ------------------------------------------------------------


def test_run_states() -> None:
    assert [s.value for s in RunStatus] == [
        "QUEUED",
        "DELAYED",
        "EXECUTING",
        "WAITING",
        "RETRYING",
        "COMPLETED",
        "FAILED",
        "CANCELED",
        "CRASHED",
        "TIMED_OUT",
        "EXPIRED",
    ]
    terminal = {s for s in RunStatus if s.is_terminal}
    assert {s.value for s in terminal} == {
        "COMPLETED",
        "FAILED",
        "CANCELED",
        "CRASHED",
        "TIMED_OUT",
        "EXPIRED",
    }


async def test_attempts_record_errors_and_tracebacks(client: Client, worker: Worker) -> None:
    handle = await tasks.typed_steps.trigger()
    await handle.result(timeout=15)
    run = await client.get_run(handle.id)
    assert run.status is RunStatus.COMPLETED
    first, second = run.attempts
    assert (first.number, first.status, second.number, second.status) == (
        1,
        "FAILED",
        2,
        "COMPLETED",
    )
    assert first.error == "RuntimeError: transient"
    assert first.traceback is not None
    assert first.traceback.startswith("Traceback (most recent call last)")
    assert 'raise RuntimeError("transient")' in first.traceback
    assert second.error is None and second.traceback is None
    assert first.worker == second.worker == worker.id
    for attempt in run.attempts:
        assert attempt.finished_at is not None and attempt.started_at <= attempt.finished_at
    assert first.finished_at is not None and first.finished_at <= second.started_at
    assert run.started_at == first.started_at
    assert run.finished_at == second.finished_at
    assert run.error is None


async def test_current_run_inside_a_run(client: Client, worker: Worker) -> None:
    handle = await tasks.whoami.trigger()
    assert await handle.result(timeout=10) == {"id": handle.id, "task_id": "whoami", "attempt": 1}


def test_current_run_outside_a_run_raises() -> None:
    with pytest.raises(ConveyorError, match="outside a conveyor run"):
        current_run()


# -- checkpoints ------------------------------------------------------------------------


async def test_step_is_checkpointed_when_it_returns(
    client: Client, worker: Worker, r: aioredis.Redis
) -> None:
    handle = await tasks.three_steps.trigger(seconds=1.0)

    async def in_step_two() -> bool:
        return "s2:start@1" in await trace(r, handle.id)

    await eventually(in_step_two, timeout=10)
    # Step 1 returned, step 2 is running: exactly step 1's result is saved.
    assert await checkpoints(client, r, handle.id) == {"slow_step#0": b'"s1"'}
    assert await handle.status() is RunStatus.EXECUTING

    assert await handle.result(timeout=10) == ["s1", "s2", "s3"]
    assert await checkpoints(client, r, handle.id) == {
        "slow_step#0": b'"s1"',
        "slow_step#1": b'"s2"',
        "slow_step#2": b'"s3"',
    }
    run = await client.get_run(handle.id)
    assert run.steps == ["slow_step#0", "slow_step#1", "slow_step#2"]


async def test_later_attempt_replays_typed_checkpoints(
    client: Client, worker: Worker, r: aioredis.Redis
) -> None:
    # The task asserts in every attempt that each step's value has its annotated type
    # (Struct, dataclass with a datetime, bytes); attempt 1 fails after the steps.
    handle = await tasks.typed_steps.trigger()
    assert await handle.result(timeout=15) == {"point": "3,6", "box": "b", "bytes": "00010203"}
    run = await client.get_run(handle.id)
    assert [a.status for a in run.attempts] == ["FAILED", "COMPLETED"]
    # Attempt 2 took every step from its checkpoint: no step ran twice.
    assert await trace(r, handle.id) == ["make_point@1", "make_box@1", "make_bytes@1"]
    assert await checkpoints(client, r, handle.id) == {
        "make_point#0": b'{"x":3,"y":6}',
        "make_box#0": b'{"label":"b","created":"2026-01-02T03:04:05"}',
        "make_bytes#0": b'"AAECAw=="',
    }


async def test_unserializable_step_result_fails_the_run(client: Client, worker: Worker) -> None:
    handle = await tasks.bad_step_task.trigger()
    with pytest.raises(RunFailed) as info:
        await handle.result(timeout=10)
    assert info.value.status == "FAILED"
    assert info.value.error is not None and "'bad_step#0'" in info.value.error
    run = await client.get_run(handle.id)
    assert run.status is RunStatus.FAILED
    # Not retried although the task allows 3 attempts: the same result would fail again.
    assert [a.status for a in run.attempts] == ["FAILED"]
    assert run.error is not None and run.error.startswith("StepResultNotSerializable")
    assert run.steps == []


async def test_unserializable_task_result_fails_the_run(client: Client, worker: Worker) -> None:
    handle = await tasks.bad_output.trigger()
    with pytest.raises(RunFailed, match="bad-output"):
        await handle.result(timeout=10)
    run = await client.get_run(handle.id)
    assert [a.status for a in run.attempts] == ["FAILED"]


async def test_gathered_steps_replay_deterministically(
    client: Client, worker: Worker, r: aioredis.Redis
) -> None:
    n = 6
    handle = await tasks.gather_steps.trigger(n)
    assert await handle.result(timeout=15) == [i * i for i in range(n)]
    run = await client.get_run(handle.id)
    assert [a.status for a in run.attempts] == ["FAILED", "COMPLETED"]
    # The steps finished in reverse order, yet each key holds the value of the call that
    # was started with that index, so attempt 2 got every value back in place.
    saved = await checkpoints(client, r, handle.id)
    assert saved == {f"square#{i}": str(i * i).encode() for i in range(n)}
    assert sorted(await trace(r, handle.id)) == sorted(f"square{i}@1" for i in range(n))


async def test_step_retry_runs_in_process(
    client: Client, worker: Worker, r: aioredis.Redis
) -> None:
    handle = await tasks.step_retry.trigger(fail_times=2)
    assert await handle.result(timeout=10) == "ok after 3"
    run = await client.get_run(handle.id)
    # The task allows one attempt: the step's own retry absorbed both failures.
    assert [a.status for a in run.attempts] == ["COMPLETED"]
    assert await trace(r, handle.id) == ["shaky@1"] * 3


async def test_step_retry_gives_up_after_its_attempts(client: Client, worker: Worker) -> None:
    handle = await tasks.step_retry.trigger(fail_times=5)
    with pytest.raises(RunFailed, match="shaky call 3 fails"):
        await handle.result(timeout=10)


async def test_run_step_with_a_sync_callable(client: Client, worker: Worker) -> None:
    handle = await tasks.sync_step.trigger(4)
    # Attempt 2 got a Point back from the checkpoint without calling scale_point again.
    assert await handle.result(timeout=10) == {"x": 4, "y": 40, "calls": 1}
    run = await client.get_run(handle.id)
    assert [a.status for a in run.attempts] == ["FAILED", "COMPLETED"]
    assert run.steps == ["scale#0"]


# -- outside a run ----------------------------------------------------------------------


@step(retry=Retry(max_attempts=2, min_delay=0.0))
async def add(a: int, b: int) -> int:
    return a + b


def multiply(a: int, b: int) -> int:
    return a * b


async def test_steps_outside_a_run_are_plain_calls() -> None:
    assert await add(2, 3) == 5
    assert await run_step("multiply", multiply, 4, 5) == 20
    assert await run_step("add", add, 1, 1) == 2
