"""Trigger options and run control (issue items 9, 10 and 11): idempotency keys, delay,
cancel, max_duration, batches, tags, triggering by id, listing, waiting for results."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
import redis.asyncio as aioredis

from conveyor import (
    Client,
    ResultTimeout,
    RunFailed,
    RunNotFound,
    RunStatus,
    Settings,
    TriggerError,
)
from conveyor.shared.redis_client import redis_client
from conveyor.worker import Worker
from tests import tasks
from tests.conftest import eventually


@pytest.fixture
async def r(client: Client) -> AsyncIterator[aioredis.Redis]:
    conn = redis_client(client.settings)
    yield conn
    await conn.aclose()


async def trace(r: aioredis.Redis, run_id: str) -> list[str]:
    return [t.decode() for t in await r.lrange(tasks.trace_key(run_id), 0, -1)]


async def _not_inflight(worker: Worker, run_id: str) -> bool:
    """The worker has let go of the run (its attempt's coroutine has ended)."""
    return run_id not in worker.inflight


# -- idempotency keys ---------------------------------------------------------------------


async def test_same_key_same_task_returns_the_existing_run(
    client: Client, worker: Worker, r: aioredis.Redis
) -> None:
    bound = tasks.echo.options(idempotency_key="order-17")
    handles = await asyncio.gather(*(bound.trigger("first") for _ in range(5)))
    assert len({h.id for h in handles}) == 1
    assert await handles[0].result(timeout=10) == "first"
    # After the run ended the key still names it, even with other arguments.
    again = await bound.trigger("second")
    assert again.id == handles[0].id
    assert await again.result(timeout=1) == "first"
    runs = (await client.list_runs(task_id="echo")).runs
    assert [run.id for run in runs] == [handles[0].id]
    assert runs[0].idempotency_key == "order-17"
    assert len(runs[0].attempts) == 1
    # The default lifetime of a key is 24 hours.
    ttl_ms = await r.pttl(client.store.keys.idempotency("echo", "order-17"))
    assert 24 * 3600 * 1000 - 60_000 < ttl_ms <= 24 * 3600 * 1000


async def test_same_key_other_task_is_another_run(client: Client, worker: Worker) -> None:
    echo = await tasks.echo.options(idempotency_key="shared").trigger("x")
    who = await tasks.whoami.options(idempotency_key="shared").trigger()
    assert echo.id != who.id
    assert await echo.result(timeout=10) == "x"
    assert (await who.result(timeout=10))["id"] == who.id


async def test_idempotency_key_lifetime_is_configurable(
    client: Client, worker: Worker, r: aioredis.Redis
) -> None:
    short = msgspec.structs.replace(client.settings, idempotency_ttl=0.5)
    async with Client(settings=short) as c:
        first = await c.trigger("echo", {"value": "a"}, idempotency_key="k")
        assert (await c.trigger("echo", {"value": "b"}, idempotency_key="k")).id == first.id
        key = client.store.keys.idempotency("echo", "k")

        async def expired() -> bool:
            return await r.exists(key) == 0

        await eventually(expired, timeout=5)
        second = await c.trigger("echo", {"value": "b"}, idempotency_key="k")
        assert second.id != first.id
        assert await first.result(timeout=10) == "a"
        assert await second.result(timeout=10) == "b"


async def test_batch_cannot_share_an_idempotency_key(client: Client) -> None:
    with pytest.raises(TriggerError, match="idempotency_key"):
        await tasks.echo.options(idempotency_key="k").batch_trigger(
            [{"value": "a"}, {"value": "b"}]
        )


# -- delay ------------------------------------------------------------------------------


async def test_delayed_run_starts_no_earlier_than_asked(client: Client, worker: Worker) -> None:
    handle = await tasks.echo.options(delay=1.0).trigger("late")
    by_id = await client.trigger("echo", {"value": "soon"}, delay=0.3)
    for h in (handle, by_id):
        assert await h.status() is RunStatus.DELAYED
        assert (await client.get_run(h.id)).attempts == []
    assert await handle.result(timeout=10) == "late"
    assert await by_id.result(timeout=10) == "soon"
    for h, delay in [(handle, 1.0), (by_id, 0.3)]:
        run = await client.get_run(h.id)
        waited = (run.attempts[0].started_at - run.created_at).total_seconds()
        assert delay <= waited < delay + 2.0, waited


# -- cancel -----------------------------------------------------------------------------


async def test_cancel_a_queued_run(client: Client) -> None:
    handle = await tasks.echo.trigger("never")
    assert await handle.status() is RunStatus.QUEUED  # no worker is running
    assert await handle.cancel() is RunStatus.QUEUED
    assert await handle.status() is RunStatus.CANCELED
    with pytest.raises(RunFailed) as info:
        await handle.result(timeout=1)
    assert (info.value.status, info.value.error) == ("CANCELED", "canceled on request")

    # A worker that starts later drops the message. With one slot it takes the messages
    # in order, so once the later run is done the canceled one has been seen.
    async with Worker(tasks.ALL, settings=client.settings, concurrency=1):
        later = await tasks.echo.trigger("later")
        assert await later.result(timeout=10) == "later"
    run = await client.get_run(handle.id)
    assert run.status is RunStatus.CANCELED
    assert run.attempts == []


async def test_cancel_a_delayed_run(client: Client, worker: Worker) -> None:
    handle = await tasks.echo.options(delay=0.5).trigger("never")
    assert await client.cancel(handle.id) is RunStatus.DELAYED
    with pytest.raises(RunFailed, match="CANCELED"):
        await handle.result(timeout=1)
    # A run triggered after it with the same delay comes out of the ladder after it.
    later = await tasks.echo.options(delay=0.5).trigger("later")
    assert await later.result(timeout=10) == "later"
    await asyncio.sleep(0.2)
    run = await client.get_run(handle.id)
    assert run.status is RunStatus.CANCELED
    assert run.attempts == []


async def test_cancel_an_executing_run(client: Client, worker: Worker, r: aioredis.Redis) -> None:
    handle = await tasks.sleeper.trigger(seconds=10)

    async def started() -> bool:
        return await trace(r, handle.id) == ["sleeper:start@1"]

    await eventually(started, timeout=10)
    assert await handle.status() is RunStatus.EXECUTING
    assert await handle.cancel() is RunStatus.EXECUTING
    with pytest.raises(RunFailed) as info:
        await handle.result(timeout=5)
    assert info.value.status == "CANCELED"

    async def attempt_closed() -> bool:
        run = await client.get_run(handle.id)
        return run.attempts[0].status == "CANCELED"

    await eventually(attempt_closed, timeout=5)
    await eventually(lambda: _not_inflight(worker, handle.id), timeout=5)
    run = await client.get_run(handle.id)
    assert run.status is RunStatus.CANCELED
    assert run.attempts[0].finished_at is not None
    # The coroutine was cancelled inside its sleep: it never reached its end.
    assert await trace(r, handle.id) == ["sleeper:start@1"]


async def test_cancel_a_run_waiting_for_its_retry(client: Client, worker: Worker) -> None:
    handle = await tasks.flaky.trigger(succeed_on=2)  # retries after 0.5 s

    async def retrying() -> bool:
        return await handle.status() is RunStatus.RETRYING

    await eventually(retrying, timeout=10)
    assert await handle.cancel() is RunStatus.RETRYING
    await asyncio.sleep(1.0)  # the retry message has come back by now and was dropped
    run = await client.get_run(handle.id)
    assert run.status is RunStatus.CANCELED
    assert [a.status for a in run.attempts] == ["FAILED"]


# -- max_duration -----------------------------------------------------------------------


async def test_max_duration_times_out_the_attempt(client: Client, worker: Worker) -> None:
    quick = await tasks.limited.trigger(seconds=0.05)
    handle = await tasks.limited.trigger(seconds=5)  # max_duration=0.5
    assert await quick.result(timeout=10) == "done"
    with pytest.raises(RunFailed) as info:
        await handle.result(timeout=10)
    assert info.value.status == "TIMED_OUT"
    assert info.value.error is not None and "max_duration=0.5s" in info.value.error
    run = await client.get_run(handle.id)
    assert run.status is RunStatus.TIMED_OUT
    [attempt] = run.attempts
    assert attempt.status == "TIMED_OUT"
    assert attempt.finished_at is not None
    # Not before max_duration, and cut short: the task would have slept 5 s (a bound a
    # loaded machine does not reach, unlike one close to 0.5 s).
    assert 0.5 <= (attempt.finished_at - attempt.started_at).total_seconds() < 5
    await eventually(lambda: _not_inflight(worker, handle.id), timeout=5)


# -- batches, tags, triggering by id ------------------------------------------------------


async def test_batch_trigger_returns_handles_in_order(client: Client, worker: Worker) -> None:
    values = list("abcdefghij")
    handles = await tasks.echo.batch_trigger([{"value": v, "times": 2} for v in values])
    assert len({h.id for h in handles}) == len(values)
    results = await asyncio.gather(*(h.result(timeout=15) for h in handles))
    assert results == [v * 2 for v in values]
    for handle, value in zip(handles, values, strict=True):
        assert (await client.get_run(handle.id)).payload == {"value": value, "times": 2}


async def test_tags_are_stored(client: Client, worker: Worker) -> None:
    tagged = await tasks.echo.options(tags=["tenant:7", "beta"]).trigger("t")
    by_id = await client.trigger("echo", {"value": "u"}, tags=["cli"])
    await tagged.result(timeout=10)
    await by_id.result(timeout=10)
    assert (await client.get_run(tagged.id)).tags == ["tenant:7", "beta"]
    assert (await client.get_run(by_id.id)).tags == ["cli"]
    assert (await client.get_run((await tasks.noop.trigger()).id)).tags == []


async def test_client_triggers_by_task_id(client: Client, worker: Worker) -> None:
    handle = await client.trigger("echo", {"value": "ab", "times": 3})
    assert await handle.result(timeout=10) == "ababab"
    run = await client.get_run(handle.id)
    assert (run.task_id, run.queue, run.payload) == ("echo", "echo", {"value": "ab", "times": 3})
    assert run.output == "ababab"
    # Canceling a run that has ended changes nothing and says how it ended.
    assert await handle.cancel() is RunStatus.COMPLETED
    assert await handle.result(timeout=1) == "ababab"


# -- reading runs -------------------------------------------------------------------------


async def test_list_runs_filters_by_task_and_status(client: Client, worker: Worker) -> None:
    echoes = [await tasks.echo.trigger(v) for v in ("a", "b")]
    nop = await tasks.noop.trigger()
    fatal = await tasks.fatal.trigger()
    for h in [*echoes, nop]:
        await h.result(timeout=10)
    with pytest.raises(RunFailed):
        await fatal.result(timeout=10)

    listed = (await client.list_runs(task_id="echo")).runs
    assert {run.id for run in listed} == {h.id for h in echoes}
    assert [run.created_at for run in listed] == sorted(
        (run.created_at for run in listed), reverse=True
    )
    assert [run.id for run in (await client.list_runs(status=RunStatus.FAILED)).runs] == [fatal.id]
    completed = (await client.list_runs(status=RunStatus.COMPLETED)).runs
    assert {run.id for run in completed} == {nop.id, *(h.id for h in echoes)}
    assert (await client.list_runs(task_id="echo", status=RunStatus.FAILED)).runs == []
    assert len((await client.list_runs(task_id="echo", status=RunStatus.COMPLETED)).runs) == 2
    assert len((await client.list_runs()).runs) == 4
    assert len((await client.list_runs(limit=1)).runs) == 1
    assert (await client.list_runs(task_id="no-such-task")).runs == []


async def test_unknown_run_id_raises_run_not_found(client: Client) -> None:
    handle = client.handle("run_does_not_exist")
    with pytest.raises(RunNotFound, match="run_does_not_exist"):
        await client.get_run(handle.id)
    with pytest.raises(RunNotFound):
        await client.cancel(handle.id)
    with pytest.raises(RunNotFound):
        await handle.status()
    with pytest.raises(RunNotFound):
        await handle.result(timeout=1)


async def test_result_timeout_when_the_run_is_not_done(client: Client) -> None:
    handle = await tasks.echo.options(delay=30).trigger("later")
    with pytest.raises(ResultTimeout) as info:
        await handle.result(timeout=0.2)
    assert info.value.run_id == handle.id and info.value.status == "DELAYED"
    with pytest.raises(TimeoutError):  # ResultTimeout is also a TimeoutError
        await handle.result(timeout=0.05)
    assert await handle.status() is RunStatus.DELAYED


def test_settings_default_idempotency_lifetime() -> None:
    assert Settings().idempotency_ttl == 24 * 3600
    assert Settings.from_env({"CONVEYOR_IDEMPOTENCY_TTL": "60"}).idempotency_ttl == 60
