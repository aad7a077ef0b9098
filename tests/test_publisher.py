"""The publisher frames its messages itself and shares one write among the publish calls
of an event-loop turn: what reaches the queues, and which caller an error goes to."""

from __future__ import annotations

import asyncio
from importlib import metadata

import aio_pika
import aiormq
import pytest

from conveyor import Client, ConfigurationError, PublishFailed, RunStatus, Settings
from conveyor.broker.internals import SUPPORTED, check_aiormq
from conveyor.broker.publisher import Outgoing
from conveyor.worker import Worker
from tests import tasks
from tests.conftest import ROOT


async def _drain(settings: Settings, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        got = []
        while (message := await q.get(fail=False, no_ack=True)) is not None:
            got.append(message)
        return got


async def test_messages_arrive_as_published(settings: Settings, client: Client) -> None:
    await client.connect()
    await client.publisher.ensure_queue("echo")
    big = b'{"x":"' + b"y" * 400_000 + b'"}'  # several body frames
    await client.publisher.publish(
        [Outgoing("echo", b"{}", message_id="small"), Outgoing("echo", big, message_id="big")]
    )
    await client.publisher.dead_letter(b"{}", "echo", "why", {"x-death": [], "n": 3})
    got = await _drain(settings, client.topology.names.queue("echo"))
    assert [(m.message_id, m.body) for m in got] == [("small", b"{}"), ("big", big)]
    for m in got:
        assert m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert m.content_type == "application/json"
    [dead] = await _drain(settings, client.topology.names.dead)
    assert dead.body == b"{}" and dead.message_id
    assert dead.headers["n"] == 3 and dead.headers["x-conveyor-reason"] == "why"
    assert "x-death" not in dead.headers


async def test_an_unroutable_message_fails_only_its_own_call(
    settings: Settings, client: Client
) -> None:
    await client.connect()
    await client.publisher.ensure_queue("echo")
    # Both calls are made in one loop turn, so their messages go out in one write.
    lost, kept = await asyncio.gather(
        client.publisher.publish([Outgoing("unrouted", b"{}", message_id="nowhere")]),
        client.publisher.publish([Outgoing("echo", b"{}", message_id="somewhere")]),
        return_exceptions=True,
    )
    assert isinstance(lost, PublishFailed) and "could not route" in str(lost)
    assert kept is None
    got = await _drain(settings, client.topology.names.queue("echo"))
    assert [m.message_id for m in got] == ["somewhere"]


async def test_a_refused_message_raises(settings: Settings, client: Client) -> None:
    await client.connect()
    name = client.topology.names.queue("full")
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            name,
            durable=True,
            arguments={"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "reject-publish"},
        )
        await queue.bind(client.topology.names.runs, "full")
        try:
            # A quorum queue applies its length limit a little late: publish until it does.
            with pytest.raises(PublishFailed, match="refused"):
                for n in range(20):
                    await client.publisher.publish([Outgoing("full", b"{}", message_id=f"m{n}")])
        finally:
            await channel.queue_delete(name)


async def test_concurrent_triggers_of_several_kinds_share_a_turn(client: Client) -> None:
    handles = await asyncio.gather(
        tasks.echo.trigger("a"),
        tasks.echo.options(tags=["t"]).trigger("b"),
        tasks.noop.trigger(),
        tasks.echo.options(delay=60).trigger("c"),
        tasks.echo.options(idempotency_key="k").trigger("d"),
        tasks.echo.options(idempotency_key="k").trigger("e"),
    )
    runs = [await client.get_run(h.id) for h in handles]
    assert [(r.task_id, r.payload, r.tags, r.status) for r in runs[:4]] == [
        ("echo", {"value": "a"}, [], RunStatus.QUEUED),
        ("echo", {"value": "b"}, ["t"], RunStatus.QUEUED),
        ("noop", {}, [], RunStatus.QUEUED),
        ("echo", {"value": "c"}, [], RunStatus.DELAYED),
    ]
    assert handles[4].id == handles[5].id and runs[4].payload == {"value": "d"}


async def test_the_aiormq_internals_are_checked_at_connect(client: Client) -> None:
    await client.connect()
    assert client.publisher.channel is not None
    channel = await client.publisher.channel.get_underlay_channel()
    check_aiormq(channel)  # the installed aiormq has what the publisher uses

    class Moved(aiormq.Channel):
        write_queue = None  # as if aiormq had renamed or retyped it

    moved = Moved.__new__(Moved)
    for name in ("confirmations", "message_id_delivery_tag", "delivery_tag", "number"):
        setattr(moved, name, getattr(channel, name))
    moved.max_content_size = channel.max_content_size
    with pytest.raises(ConfigurationError) as refused:
        check_aiormq(moved)
    message = str(refused.value)
    assert f"aiormq {metadata.version('aiormq')}" in message
    assert f"aiormq{SUPPORTED}" in message and "Channel.write_queue" in message
    # pyproject.toml pins the range the check names
    assert f'"aiormq{SUPPORTED}"' in (ROOT / "pyproject.toml").read_text()


async def test_the_worker_publishes_on_its_own_connection(worker: Worker) -> None:
    assert worker.publisher.connection is not None
    assert worker._connection is not None
    assert worker.publisher.connection is not worker._connection
    await worker.shutdown()
    assert worker.publisher.connection.is_closed
