"""A trigger published by a plain AMQP client following docs/wire-format.md runs (item 14).

The test takes the example body and the aio-pika code from the document itself, so the
document cannot drift from what the worker accepts.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import msgspec
import pytest
from aio_pika.exceptions import DeliveryError, PublishError

from conveyor import Client, RunStatus, Settings, current_run, task
from conveyor.broker.delay import LEVELS
from conveyor.broker.topology import work_queue_arguments
from conveyor.shared.keys import Keys
from conveyor.shared.models import RunMessage
from conveyor.shared.redis_client import redis_client
from conveyor.worker import Worker
from tests.conftest import ROOT, eventually

DOC = (ROOT / "docs" / "wire-format.md").read_text()

EXECUTIONS: list[str] = []


@task(id="resize-image")
async def resize_image(url: str, width: int = 800) -> dict[str, str]:
    EXECUTIONS.append(current_run().id)
    return {"thumbnail": f"{url.removesuffix('.jpg')}-{width}.jpg"}


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", DOC, flags=re.S | re.M)


def _doc_code(defines: str) -> dict[str, Any]:
    """Execute the document's Python block that defines `defines`; return its globals."""
    [code] = [b for b in _blocks("python") if f"def {defines}(" in b]
    scope: dict[str, Any] = {"__name__": "wire_format_doc"}
    exec(compile(code, "docs/wire-format.md", "exec"), scope)
    return scope


def _example_body() -> dict[str, Any]:
    [body] = _blocks("json")
    decoded: dict[str, Any] = msgspec.json.decode(body)
    return decoded


@pytest.fixture
async def channel(settings: Settings) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        yield await connection.channel()


@pytest.fixture
async def resize_worker(settings: Settings, client: Client) -> AsyncIterator[Worker]:
    async with Worker([resize_image], settings=settings, concurrency=4) as w:
        yield w


async def _hash_result(settings: Settings, run_id: str) -> list[Any]:
    """Poll the run hash exactly as the document says, until the run has ended."""
    r = redis_client(settings)
    key = f"{settings.namespace}:{{{run_id}}}:run"  # the document's key layout
    assert key == Keys(settings.namespace).run(run_id)
    final = {b"COMPLETED", b"FAILED", b"CANCELED", b"CRASHED", b"TIMED_OUT", b"EXPIRED"}

    async def ended() -> list[Any] | None:
        reply: list[Any] = await r.hmget(key, ["status", "output", "error"])
        return reply if reply[0] in final else None

    try:
        result: list[Any] = await eventually(ended, timeout=15)
        return result
    finally:
        await r.aclose()


async def test_documented_example_runs(
    settings: Settings, client: Client, channel: aio_pika.abc.AbstractChannel
) -> None:
    body = _example_body()
    # Before any worker: the producer declares the queue as documented, publishes the
    # example, and only then a worker starts; its own declaration must agree exactly.
    await _doc_code("declare_queue")["declare_queue"](channel, settings.namespace, "resize-image")
    await _doc_code("trigger")["trigger"](settings.amqp_url, settings.namespace, body["task"], body)
    async with Worker([resize_image], settings=settings, concurrency=4):
        status, output, error = await _hash_result(settings, body["id"])
    assert (status, error) == (b"COMPLETED", None)
    assert msgspec.json.decode(output) == {"thumbnail": "s3://photos/cat-320.jpg"}
    assert '"{\\"thumbnail\\":\\"s3://photos/cat-320.jpg\\"}"' in DOC  # the shown output

    run = await client.get_run(body["id"])
    assert run.status is RunStatus.COMPLETED
    assert run.task_id == "resize-image" and run.queue == "resize-image"
    assert run.payload == body["payload"]
    assert run.tags == body["tags"]
    assert run.output == {"thumbnail": "s3://photos/cat-320.jpg"}
    assert [a.status for a in run.attempts] == ["COMPLETED"]


class _Delivery:
    """A delivery without any id, as some AMQP clients send: aio-pika (aiormq) always
    fills in a random message_id, so the worker's own fallback is driven directly."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.headers: dict[str, Any] = {}
        self.message_id: str | None = None
        self.acked = False

    def ack(self) -> None:
        self.acked = True


async def test_run_ids_without_id_and_duplicates(
    settings: Settings, client: Client, resize_worker: Worker
) -> None:
    trigger = _doc_code("trigger")["trigger"]
    base = {"task": "resize-image", "payload": {"url": "a.jpg"}}
    EXECUTIONS.clear()
    # The id in the body; the same message twice still makes one run.
    await trigger(settings.amqp_url, settings.namespace, "resize-image", {**base, "id": "wire-1"})
    await trigger(settings.amqp_url, settings.namespace, "resize-image", {**base, "id": "wire-1"})
    # No id in the body: the message_id property names the run.
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        ch = await connection.channel(publisher_confirms=True, on_return_raises=True)
        runs = await ch.get_exchange(f"{settings.namespace}.runs", ensure=False)
        message = aio_pika.Message(
            msgspec.json.encode(base),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id="wire-2",
        )
        await runs.publish(message, "resize-image", mandatory=True)
    # No id at all: the worker names the run and republishes it under that name.
    delivery = _Delivery(msgspec.json.encode(base))
    await resize_worker._handle("resize-image", delivery)  # type: ignore[arg-type]
    assert delivery.acked

    async def three_completed() -> list[Any]:
        found = (await client.list_runs(task_id="resize-image", status=RunStatus.COMPLETED)).runs
        return found if len(found) == 3 else []

    ids = {r.id for r in await eventually(three_completed, timeout=15)}
    assert {"wire-1", "wire-2"} < ids
    [named] = ids - {"wire-1", "wire-2"}
    assert named.startswith("run_")
    assert sorted(EXECUTIONS) == sorted(ids), "each run executed once"
    assert (await client.get_run(named)).payload == {"url": "a.jpg"}
    assert len((await client.list_runs()).runs) == 3


async def test_idempotency_key_over_the_wire(
    settings: Settings, client: Client, resize_worker: Worker
) -> None:
    trigger = _doc_code("trigger")["trigger"]
    base = {"task": "resize-image", "payload": {"url": "b.jpg"}, "idempotency_key": "order-42"}
    for run_id in ("wire-a", "wire-b"):
        await trigger(settings.amqp_url, settings.namespace, "resize-image", {**base, "id": run_id})

    async def completed() -> list[Any]:
        return (await client.list_runs(task_id="resize-image", status=RunStatus.COMPLETED)).runs

    [run] = await eventually(completed, timeout=15)
    assert run.id in ("wire-a", "wire-b") and run.idempotency_key == "order-42"
    late = await client.trigger("resize-image", {"url": "c.jpg"}, idempotency_key="order-42")
    assert late.id == run.id, "the Python client sees the key taken over the wire"
    r = redis_client(settings)
    try:  # the documented key holds the id of the run that has the key
        assert await r.get(f"{settings.namespace}:idem:resize-image:order-42") == run.id.encode()
    finally:
        await r.aclose()
    await asyncio.sleep(0.2)  # the other message has been dropped, not run late
    assert len((await client.list_runs()).runs) == 1


async def test_publishing_without_a_queue_is_returned(settings: Settings, client: Client) -> None:
    await client.connect()  # declares the namespace's exchanges, but no work queue
    body = {**_example_body(), "task": "no-worker-yet"}
    with pytest.raises((DeliveryError, PublishError)):
        await _doc_code("trigger")["trigger"](
            settings.amqp_url, settings.namespace, "no-worker-yet", body
        )


def test_documented_queue_declaration_matches_topology() -> None:
    scope = _doc_code("declare_queue")
    settings = Settings(namespace="ns")
    documented = {**scope["QUEUE_ARGUMENTS"], "x-dead-letter-exchange": "ns.dead"}
    assert documented == work_queue_arguments(settings)
    assert scope["DELAY_LEVELS"] == LEVELS
    for name, value in work_queue_arguments(Settings(namespace="conveyor")).items():
        shown = str(value).replace("conveyor.", "{namespace}.")
        assert f"| `{name}` | `{shown}`" in DOC, name


def test_documented_body_fields_are_the_run_message() -> None:
    section = DOC.split("## The body", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
    assert documented == list(RunMessage.__struct_fields__)
    example = _example_body()
    assert msgspec.json.decode(msgspec.json.encode(example), type=RunMessage).id == example["id"]
    # "Fields the worker does not know are ignored"
    newer = msgspec.json.encode({**example, "priority": 3, "trace": {"a": 1}})
    assert msgspec.json.decode(newer, type=RunMessage).task == "resize-image"
