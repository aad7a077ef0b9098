"""Writes are fenced (issue 7 item 3): only the worker and attempt holding a run write its
checkpoints and outcome. A worker that stalled past its lease (SIGSTOP here: a paused VM,
a blocked event loop) and was replaced learns it lost the run at its next write, and
stops without writing anything."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aio_pika
import msgspec
import pytest

from conveyor import Client, RunStatus, Settings
from conveyor.broker.topology import Names
from conveyor.shared.errors import RunLost
from conveyor.shared.models import RunMessage
from conveyor.shared.redis_client import redis_client
from conveyor.shared.store import NewRun, RunStore
from tests import tasks
from tests.conftest import WorkerProcess, eventually
from tests.faults import pid_of, trace, wait_for_consumers

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def store(settings: Settings, client: Client) -> Any:
    quick = msgspec.structs.replace(settings, lease_ttl=0.3)
    r = redis_client(quick)
    s = RunStore(r, quick)
    yield s
    await s.close()
    await r.aclose()


async def _new_run(store: RunStore, run_id: str) -> None:
    await store.create([NewRun(run_id, "t", "t", b"{}", [], None, 0)])


async def test_a_replaced_attempt_can_neither_checkpoint_nor_finish(store: RunStore) -> None:
    await _new_run(store, "run_f1")
    first = await store.claim("run_f1", "w1", "1")
    assert (first.kind, first.attempt) == ("run", 1)
    assert await store.checkpoint("run_f1", "w1", 1, "a#0", b'"a1"') == b'"a1"'
    await asyncio.sleep(0.4)  # w1 stalls past its lease; w2 takes the run over
    second = await store.claim("run_f1", "w2", "1")
    assert (second.kind, second.attempt, second.crashes) == ("run", 2, 1)
    assert second.checkpoints == {"a#0": b'"a1"'}

    with pytest.raises(RunLost):
        await store.checkpoint("run_f1", "w1", 1, "b#0", b'"late"')
    late = await store.finish(
        "run_f1", "w1", 1, run_status=RunStatus.COMPLETED, attempt_status="COMPLETED"
    )
    assert late.kind == "stale"
    # The holder writes; the first result saved under a key stands.
    assert await store.checkpoint("run_f1", "w2", 2, "b#0", b'"b2"') == b'"b2"'
    assert await store.checkpoint("run_f1", "w2", 2, "b#0", b'"other"') == b'"b2"'
    steps = await store.redis.hgetall(store.keys.steps("run_f1"))
    assert steps == {b"a#0": b'"a1"', b"b#0": b'"b2"'}


async def test_a_checkpoint_after_a_cancel_writes_nothing(store: RunStore) -> None:
    await _new_run(store, "run_f2")
    await store.claim("run_f2", "w1", "1")
    assert await store.cancel("run_f2") == "EXECUTING"
    with pytest.raises(RunLost, match="CANCELED"):
        await store.checkpoint("run_f2", "w1", 1, "a#0", b"1")
    # No steps hash was created, so none is left behind without a TTL.
    assert await store.redis.exists(store.keys.steps("run_f2")) == 0
    assert await store.redis.ttl(store.keys.run("run_f2")) > 0


async def test_repeated_claims_and_finishes_are_answered_as_the_first(store: RunStore) -> None:
    await _new_run(store, "run_f3")
    claim = await store.claim("run_f3", "w1", "7")
    again = await store.claim("run_f3", "w1", "7")
    assert (again.kind, again.attempt, again.crashes) == ("run", claim.attempt, 0)
    # Another claim (another delivery) of the same worker is a different claim: busy.
    assert (await store.claim("run_f3", "w1", "8")).kind == "busy"
    for _ in range(2):
        retry = await store.finish(
            "run_f3",
            "w1",
            1,
            run_status=RunStatus.RETRYING,
            attempt_status="FAILED",
            error="E",
            retry_delay_ms=5000,
        )
        assert retry.kind == "ok" and retry.at_ms > 0
    assert await store.redis.hget(store.keys.run("run_f3"), "failures") == b"1"


async def _publish_copy(settings: Settings, run_id: str, payload: bytes) -> None:
    """A second message for a running run, as a reaper or a redelivery would bring."""
    body = msgspec.json.encode(
        RunMessage(task="three-steps", payload=msgspec.Raw(payload), id=run_id)
    )
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(Names(settings.namespace).runs)
        message = aio_pika.Message(
            body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=run_id
        )
        await exchange.publish(message, routing_key="three-steps", mandatory=True)


async def test_a_sigstopped_worker_replaced_mid_step_writes_nothing_when_resumed(
    client: Client, settings: Settings, spawn_worker: Any, tmp_path: Path
) -> None:
    # One delivery at a time: the copy below goes to the other worker, not to this one.
    stalled = WorkerProcess(
        settings, "--concurrency", "1", "--prefetch", "1", log=tmp_path / "stalled.log"
    )
    try:
        await wait_for_consumers(settings, "three-steps", 1)
        handle = await tasks.three_steps.trigger(seconds=4.0)

        async def in_step_two() -> bool:
            return "s2:start@1" in await trace(settings, handle.id)

        await eventually(in_step_two, timeout=20)
        first = (await client.get_run(handle.id)).attempts[-1]
        assert pid_of(first.worker) == stalled.proc.pid
        stalled.kill(signal.SIGSTOP)
        await asyncio.sleep(settings.lease_ttl + 0.5)  # its lease runs out

        spawn_worker()
        await wait_for_consumers(settings, "three-steps", 2)
        await _publish_copy(settings, handle.id, b'{"seconds": 4.0}')
        assert await handle.result(timeout=30) == ["s1", "s2", "s3"]
        done = await client.get_run(handle.id)
        steps = await client.redis.hgetall(client.store.keys.steps(handle.id))
        assert [a.status for a in done.attempts] == ["CRASHED", "COMPLETED"]

        stalled.kill(signal.SIGCONT)
        # The stalled attempt wakes in step 2: its lease renewal or its checkpoint is
        # refused, and it stops without writing.
        await eventually(lambda: _logged(stalled, "attempt 1 lost the run"), timeout=15)
        await asyncio.sleep(1.0)
        after = await client.get_run(handle.id)
        assert after.status is RunStatus.COMPLETED
        assert after.output == done.output
        assert after.attempts == done.attempts
        assert await client.redis.hgetall(client.store.keys.steps(handle.id)) == steps
        assert "s1:start@2" not in await trace(settings, handle.id)  # replayed, not rerun
        assert stalled.proc.poll() is None  # and the stalled worker keeps working
    finally:
        stalled.kill(signal.SIGCONT)
        stalled.kill()
        stalled.wait()


async def _logged(worker: WorkerProcess, text: str) -> bool:
    return text in worker.output()
