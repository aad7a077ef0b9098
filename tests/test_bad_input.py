"""Bad input never kills a worker or loses other work (issue item 8).

Malformed messages published straight to the runs exchange are dead-lettered with a
reason header while good runs around them complete; what a trigger call can check
(arguments, payload size) it refuses at once; what only the worker can check (argument
types) fails the run at its start, without retries, naming the argument.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import aio_pika
import msgspec
import pytest

from conveyor import Client, InvalidArguments, PayloadTooLarge, RunFailed, RunStatus, Settings
from conveyor.broker.publisher import QUEUE_HEADER, REASON_HEADER
from conveyor.broker.topology import Names
from conveyor.worker import Worker
from tests import tasks

WORKER_LIMIT = 4096  # the spawned worker's CONVEYOR_MAX_PAYLOAD_BYTES


async def publish_raw(settings: Settings, routing_key: str, bodies: Iterable[bytes]) -> None:
    """Publish bodies to {ns}.runs as any AMQP client could, confirmed and mandatory."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(Names(settings.namespace).runs, ensure=False)
        for body in bodies:
            message = aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await exchange.publish(message, routing_key, mandatory=True)


async def dead_letters(settings: Settings, count: int, timeout: float = 20.0) -> list[Any]:
    """Take `count` messages from the namespace's dead-letter queue, waiting for them."""
    found: list[Any] = []
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(Names(settings.namespace).dead, passive=True)
        deadline = asyncio.get_running_loop().time() + timeout
        while len(found) < count:
            message = await queue.get(no_ack=True, fail=False)
            if message is not None:
                found.append(message)
                continue
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{len(found)} of {count} dead letters within {timeout}s")
            await asyncio.sleep(0.05)
        assert await queue.get(no_ack=True, fail=False) is None, "more dead letters than sent"
    return found


def _body(**fields: Any) -> bytes:
    return msgspec.json.encode(fields)


# body -> what the x-conveyor-reason header must say
BAD_BODIES: dict[bytes, str] = {
    b"this is not json": "invalid message body: JSON is malformed",
    b"[1, 2]": "invalid message body: Expected `object`, got `array`",
    _body(payload={"value": "x"}): "missing required field `task`",
    _body(task=42): "Expected `str`, got `int` - at `$.task`",
    _body(task="echo", payload=["x"]): "payload must be a JSON object",
    _body(task="echo", payload={}, tags="urgent"): "at `$.tags`",
    _body(task="echo", payload={"value": "x"}, id="bad id}"): "run id 'bad id}' is not valid",
    _body(task="no-such-task", payload={}): "unknown task 'no-such-task'",
    _body(task="echo", payload={"value": "x" * WORKER_LIMIT}): (
        f"payload of {WORKER_LIMIT + 12} bytes is over the limit of {WORKER_LIMIT}"
    ),
    _body(task="echo", payload={"value": "x" * (WORKER_LIMIT + 70_000)}): "bytes is over the limit",
}


async def test_bad_messages_are_dead_lettered_and_the_worker_keeps_working(
    client: Client, spawn_worker: Any
) -> None:
    proc = spawn_worker(env={"CONVEYOR_MAX_PAYLOAD_BYTES": str(WORKER_LIMIT)})
    before = await tasks.echo.trigger("before")  # also declares the echo queue
    await publish_raw(client.settings, "echo", BAD_BODIES)
    after = await tasks.echo.trigger("after")

    assert await before.result(timeout=20) == "before"
    assert await after.result(timeout=20) == "after"
    letters = await dead_letters(client.settings, len(BAD_BODIES))
    reasons = {m.body: m.headers[REASON_HEADER] for m in letters}
    assert set(reasons) == set(BAD_BODIES), "each bad body is dead-lettered unchanged"
    for body, expected in BAD_BODIES.items():
        assert expected in reasons[body], (body[:60], reasons[body])
    assert {m.headers[QUEUE_HEADER] for m in letters} == {"echo"}

    # The worker is still up and still working; nothing but the two good runs exists.
    still = await tasks.echo.trigger("still")
    assert await still.result(timeout=20) == "still"
    assert proc.proc.poll() is None
    runs = await client.list_runs()
    assert sorted(r.payload["value"] for r in runs) == ["after", "before", "still"]
    assert {r.status for r in runs} == {RunStatus.COMPLETED}


async def test_wrong_argument_types_fail_the_run_at_start_without_retries(
    client: Client, worker: Worker
) -> None:
    # flaky retries up to 4 times; an argument error must not be retried.
    cases = {
        "succeed_on": ({"succeed_on": "two"}, "Expected `int`, got `str` - at `$.succeed_on`"),
        "missing": ({}, "missing required field `succeed_on`"),
        "unknown": ({"succeed_on": 1, "retries": 2}, "unknown field `retries`"),
    }
    handles = {name: await client.trigger("flaky", payload) for name, (payload, _) in cases.items()}
    for name, (_, expected) in cases.items():
        with pytest.raises(RunFailed) as failure:
            await handles[name].result(timeout=10)
        assert expected in str(failure.value)
        run = await client.get_run(handles[name].id)
        assert run.status is RunStatus.FAILED
        assert [a.status for a in run.attempts] == ["FAILED"]
        assert run.error is not None
        assert run.error.startswith("InvalidArguments: invalid arguments for task 'flaky'")


async def test_wrong_arguments_are_refused_at_trigger(client: Client) -> None:
    with pytest.raises(InvalidArguments, match="unexpected keyword argument 'nope'"):
        await tasks.echo.trigger("a", nope=1)  # type: ignore[call-arg]
    with pytest.raises(InvalidArguments, match="missing a required argument: 'value'"):
        await tasks.echo.trigger(times=2)  # type: ignore[call-arg]
    with pytest.raises(InvalidArguments, match="too many positional arguments"):
        await tasks.echo.trigger("a", 2, 3)  # type: ignore[call-arg]
    with pytest.raises(InvalidArguments, match="argument 'value'"):
        await tasks.echo.trigger(object())  # type: ignore[arg-type]
    with pytest.raises(InvalidArguments, match="not JSON-serializable"):
        await client.trigger("echo", {"value": object()})
    with pytest.raises(InvalidArguments, match="'nope'"):
        await tasks.echo.batch_trigger([{"value": "ok"}, {"value": "a", "nope": 1}])
    assert await client.list_runs() == [], "a refused trigger creates no run"


async def test_oversize_payload_is_refused_at_trigger(client: Client, settings: Settings) -> None:
    assert Settings().max_payload_bytes == 1024 * 1024
    assert settings.max_payload_bytes == 1024 * 1024
    with pytest.raises(PayloadTooLarge, match="over the limit of 1048576 bytes") as refused:
        await tasks.echo.trigger("x" * (1024 * 1024))
    assert "CONVEYOR_MAX_PAYLOAD_BYTES" in str(refused.value)
    assert refused.value.task_id == "echo"

    small = msgspec.structs.replace(settings, max_payload_bytes=100)
    async with Client(settings=small) as limited:
        # {"value":"..."} is 12 bytes of JSON around the string: 100 bytes is at the limit.
        accepted = await tasks.echo.trigger("x" * 88)
        assert await accepted.status() is RunStatus.QUEUED
        with pytest.raises(PayloadTooLarge, match="is 101 bytes, over the limit of 100"):
            await tasks.echo.trigger("x" * 89)
        with pytest.raises(PayloadTooLarge):
            await limited.trigger("echo", {"value": "x" * 89})
        with pytest.raises(PayloadTooLarge):
            await tasks.echo.batch_trigger([{"value": "a"}, {"value": "x" * 500}])
    assert [r.id for r in await client.list_runs()] == [accepted.id]
