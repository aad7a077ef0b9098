"""No double execution (issue item 5): a duplicate message for a run that is executing
elsewhere under a live lease never starts a second, concurrent execution."""

from __future__ import annotations

from typing import Any

import aio_pika
import msgspec

from conveyor import Client, RunStatus, Settings
from conveyor.broker.topology import Names
from conveyor.shared.models import RunMessage
from conveyor.shared.store import Claim
from conveyor.worker import Worker
from tests import tasks
from tests.conftest import eventually
from tests.faults import drained, drop_traces, pid_of, trace, wait_for_consumers

DUPLICATES = 3


async def _publish_duplicates(settings: Settings, run_id: str, payload: bytes, n: int) -> None:
    """Publish copies of a run's trigger the way any AMQP client could (wire format)."""
    body = msgspec.json.encode(RunMessage(task="sleeper", payload=msgspec.Raw(payload), id=run_id))
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(Names(settings.namespace).runs)
        for _ in range(n):
            message = aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=run_id,
            )
            await exchange.publish(message, routing_key="sleeper", mandatory=True)


def _spy_on_claims(worker: Worker) -> list[str]:
    """Record the kind of every claim the worker makes."""
    kinds: list[str] = []
    original = worker.store.claim

    async def claim(*args: Any, **kwargs: Any) -> Claim:
        result = await original(*args, **kwargs)
        kinds.append(result.kind)
        return result

    worker.store.claim = claim  # type: ignore[method-assign]
    return kinds


async def test_duplicate_of_an_executing_run_does_not_run_twice(
    client: Client, settings: Settings, spawn_worker: Any
) -> None:
    # Worker A takes one message at a time, so the duplicates go to worker B.
    a = spawn_worker("--concurrency", "1")
    await wait_for_consumers(settings, "sleeper", 1)
    # Longer than two lease periods: A must keep renewing its lease while B sees the copies.
    seconds = 2.5 * settings.lease_ttl
    handle = await tasks.sleeper.trigger(seconds=seconds)
    b = Worker(tasks.ALL, settings=settings, concurrency=10)
    claims = _spy_on_claims(b)
    try:

        async def started() -> bool:
            return "sleeper:start@1" in await trace(settings, handle.id)

        await eventually(started, timeout=20)
        await b.start()
        payload = msgspec.json.encode({"seconds": seconds})
        await _publish_duplicates(settings, handle.id, payload, DUPLICATES)

        async def all_deferred() -> bool:
            return claims.count("busy") >= DUPLICATES

        await eventually(all_deferred, timeout=10)
        assert "run" not in claims
        assert await handle.result(timeout=20) == "slept"

        # Wait until every copy came back from the delay ladder and was dropped.
        await eventually(lambda: drained(settings, ["sleeper"]), timeout=15)
        assert "run" not in claims
        assert await trace(settings, handle.id) == ["sleeper:start@1", "sleeper:end@1"]
        run = await client.get_run(handle.id)
        assert run.status is RunStatus.COMPLETED
        assert [x.status for x in run.attempts] == ["COMPLETED"]
        assert pid_of(run.attempts[0].worker) == a.proc.pid
    finally:
        await b.shutdown()
        await drop_traces(settings, handle.id)
