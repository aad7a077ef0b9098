"""Bad input never kills a worker or loses other work (issue item 8).

Malformed messages published straight to the runs exchange are dead-lettered with a
reason header while good runs around them complete; what a trigger call can check
(arguments, payload size) it refuses at once; what only the worker can check (argument
types) fails the run at its start, without retries, naming the argument.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aio_pika
import msgspec
import pytest

from conveyor import (
    Client,
    InvalidArguments,
    InvalidOption,
    PayloadTooLarge,
    RunFailed,
    RunStatus,
    Settings,
    task,
)
from conveyor.broker.publisher import DROPPED_HEADER, QUEUE_HEADER, REASON_HEADER
from conveyor.broker.topology import Names
from conveyor.shared.bounds import MAX_IDEMPOTENCY_KEY_CHARS, MAX_TAG_CHARS, MAX_TAGS
from conveyor.worker import Worker
from tests import tasks

WORKER_LIMIT = 4096  # the spawned worker's CONVEYOR_MAX_PAYLOAD_BYTES


async def publish_raw(
    settings: Settings,
    routing_key: str,
    bodies: Iterable[bytes],
    headers: dict[str, Any] | None = None,
) -> None:
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
                headers=headers,
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


DEEP = b"[" * 10_000 + b"]" * 10_000


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
    # Nested 10,000 deep: past the decoder's recursion limit, in the payload and elsewhere.
    b'{"task":"echo","payload":{"value":' + DEEP + b"}}": "JSON is nested too deeply",
    b'{"task":"echo","extra":' + DEEP + b"}": "JSON is nested too deeply",
    _body(task="echo", payload={"value": "x"}, id="nb-far", not_before=10**15): (
        "not_before 1000000000000000 is more than 366 days ahead"
    ),
    _body(task="echo", payload={"value": "x"}, id="nb-huge", not_before=10**30): "days ahead",
    _body(task="echo", payload={"value": "x"}, id="nb-neg", not_before=-1): (
        "not_before -1 is negative"
    ),
    _body(task="echo", payload={"value": "x"}, not_before=1.5): "at `$.not_before`",
    _body(task="echo", payload={"value": "x"}, not_before="soon"): "at `$.not_before`",
    _body(task="echo", payload={"value": "x"}, tags=["t"] * (MAX_TAGS + 1)): (
        f"tags: at most {MAX_TAGS} tags, got {MAX_TAGS + 1}"
    ),
    _body(task="echo", payload={"value": "x"}, tags=["t" * (MAX_TAG_CHARS + 1)]): (
        f"a tag is at most {MAX_TAG_CHARS} characters"
    ),
    _body(task="echo", payload={"value": "x"}, idempotency_key="k" * 1000): (
        f"idempotency_key: must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters, got 1000"
    ),
    _body(task="bad task!", payload={}): "task id 'bad task!' is not valid",
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
    runs = (await client.list_runs()).runs
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
    assert (await client.list_runs()).runs == [], "a refused trigger creates no run"


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
    assert [r.id for r in (await client.list_runs()).runs] == [accepted.id]


ODD_HEADERS: dict[str, Any] = {
    "x-delivery-count": "seven",  # RabbitMQ's header, of the wrong type
    "x-conveyor-reason": 42,
    "x-death": "not a list",
    "nested": {
        "a": [1, 2.5, None, True, {"b": bytearray(b"bytes")}],
        "when": datetime(2020, 1, 1, tzinfo=UTC),
    },
    "decimal": Decimal("1.25"),
    "empty": None,
}


async def test_odd_and_oversize_headers_do_not_break_handling(
    client: Client, spawn_worker: Any
) -> None:
    proc = spawn_worker()
    before = await tasks.echo.trigger("before")
    assert await before.result(timeout=20) == "before"
    # A dead letter's headers must fit in one frame (frame_max, 128 KiB here); the message
    # itself may carry up to that, so its copy with conveyor's reason would not fit.
    await client.connect()
    assert client.publisher.channel is not None
    frame = (await client.publisher.channel.get_underlay_channel()).max_content_size
    big = {"padding": "p" * (frame - 200)}
    await publish_raw(client.settings, "echo", [b"odd headers, not json"], ODD_HEADERS)
    await publish_raw(client.settings, "echo", [b"big headers, not json"], big)
    # An unknown task with a string delivery count is still put back, then dead-lettered.
    await publish_raw(client.settings, "echo", [_body(task="nobody", payload={})], ODD_HEADERS)
    ok = await client.trigger("echo", {"value": "ok"})
    assert await ok.result(timeout=20) == "ok"

    letters = {m.body: m for m in await dead_letters(client.settings, 3)}
    odd = letters[b"odd headers, not json"].headers
    assert "JSON is malformed" in odd[REASON_HEADER]
    assert odd["nested"]["a"][:4] == [1, 2.5, None, True] and odd["decimal"] == Decimal("1.25")
    assert "x-death" not in odd, "RabbitMQ's history is not copied"
    large = letters[b"big headers, not json"].headers
    assert "JSON is malformed" in large[REASON_HEADER] and large[QUEUE_HEADER] == "echo"
    assert "padding" not in large
    assert "1 headers dropped" in large[DROPPED_HEADER]
    unknown = letters[_body(task="nobody", payload={})].headers
    assert unknown[REASON_HEADER] == "unknown task 'nobody'"
    assert unknown["nested"] == odd["nested"]  # (x-delivery-count is the dead queue's own)
    assert proc.proc.poll() is None


async def test_options_over_their_bounds_are_refused_at_trigger(client: Client) -> None:
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"tags": ["t"] * (MAX_TAGS + 1)}, "tags", f"at most {MAX_TAGS} tags"),
        ({"tags": ["t" * (MAX_TAG_CHARS + 1)]}, "tags", f"at most {MAX_TAG_CHARS} characters"),
        ({"idempotency_key": "k" * 257}, "idempotency_key", "must be 1 to 256 characters"),
        ({"idempotency_key": ""}, "idempotency_key", "got 0"),
        ({"delay": -1}, "delay", "must be 0 to"),
        ({"delay": 400 * 86_400}, "delay", "got 34560000"),
        ({"delay": float("inf")}, "delay", "got inf"),
        ({"delay": float("nan")}, "delay", "got nan"),
    ]
    for options, field, detail in cases:
        with pytest.raises(InvalidOption, match=detail) as refused:
            await tasks.echo.options(**options).trigger("x")
        assert refused.value.field == field
        assert f"invalid trigger option {field}" in str(refused.value)
        with pytest.raises(InvalidOption):
            await client.trigger("echo", {"value": "x"}, **options)
    # At the bounds: accepted.
    edge = tasks.echo.options(
        tags=["t" * MAX_TAG_CHARS] * MAX_TAGS, idempotency_key="k" * MAX_IDEMPOTENCY_KEY_CHARS
    )
    accepted = await edge.trigger("x")
    assert (await accepted.get()).tags == ["t" * MAX_TAG_CHARS] * MAX_TAGS
    assert [r.id for r in (await client.list_runs()).runs] == [accepted.id]


@task(id="anything")
async def anything(value: Any) -> Any:
    return value


def test_a_payload_nested_too_deeply_is_invalid_arguments() -> None:
    deep = b'{"value":' + DEEP + b"}"
    with pytest.raises(InvalidArguments, match="payload is nested too deeply"):
        anything.decode_arguments(deep)
    nested: Any = []
    for _ in range(10_000):
        nested = [nested]
    with pytest.raises(InvalidArguments, match="argument 'value'"):
        anything.encode_arguments((nested,), {})


def test_a_prefetch_below_the_concurrency_is_refused(settings: Settings) -> None:
    from conveyor import ConfigurationError
    from conveyor.worker import Worker

    with pytest.raises(
        ConfigurationError, match=r"prefetch \(4\) must be at least the concurrency \(8\)"
    ):
        Worker(tasks.ALL, settings=settings, concurrency=8, prefetch=4)
    assert Worker(tasks.ALL, settings=settings, concurrency=8).prefetch == 16
