"""`trigger` returns a handle only for a run that exists in Redis with its message
confirmed (issue item 12); otherwise TriggerIncomplete says whether the run may start.

Redis faults use a redis-server of the test's own, killed and started again on the same
port; RabbitMQ is the shared one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aio_pika
import msgspec
import pytest

from conveyor import Client, RunStatus, Settings, TriggerIncomplete
from conveyor.shared.store import NewRun
from conveyor.worker import Worker
from tests import tasks
from tests.conftest import cleanup
from tests.servers import OwnRedis


@pytest.fixture
async def own_settings(settings: Settings, own_redis: OwnRedis) -> AsyncIterator[Settings]:
    """The test's namespace on the shared RabbitMQ and the test's own Redis, with a short
    trigger budget."""
    yield msgspec.structs.replace(
        settings,
        redis_url=own_redis.url,
        publish_timeout=2.0,
    )
    await cleanup(settings)  # the namespace's queues (its Redis goes with the server)


async def _queued(settings: Settings, queue: str) -> int:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(f"{settings.namespace}.q.{queue}", passive=True)
        return declared.declaration_result.message_count or 0


async def test_published_but_not_recorded_raises_and_the_run_still_completes(
    own_settings: Settings, own_redis: OwnRedis
) -> None:
    async with Client(settings=own_settings) as client:
        warm = await tasks.echo.trigger("warm")  # connected, queue declared
        own_redis.stop()
        started = time.monotonic()
        with pytest.raises(TriggerIncomplete) as incomplete:
            await tasks.echo.trigger("through the broker")
        waited = time.monotonic() - started
        error = incomplete.value
        assert error.published is True
        assert error.run_id.startswith("run_") and error.run_ids == [error.run_id]
        assert error.run_id in str(error) and "it will still start" in str(error)
        assert 1.5 <= waited <= 6, "the create was retried within the trigger's budget"
        assert await _queued(own_settings, "echo") == 2  # the warm-up run's and this one

        # Redis comes back empty (no persistence): the worker records the run from its message.
        own_redis.start()
        async with Worker(tasks.ALL, settings=own_settings, concurrency=4):
            assert await client.handle(error.run_id).result(timeout=20) == "through the broker"
            run = await client.get_run(error.run_id)
            assert run.status is RunStatus.COMPLETED and run.payload == {
                "value": "through the broker"
            }
        assert warm.id != error.run_id


async def test_not_recorded_before_the_publish_raises_unpublished(
    own_settings: Settings, own_redis: OwnRedis
) -> None:
    async with Client(settings=own_settings) as client:
        await tasks.echo.trigger("warm")
        own_redis.stop()
        # An idempotency key (or a delay) is looked up before anything is published.
        for options in ({"idempotency_key": "k1"}, {"delay": 5.0}):
            with pytest.raises(TriggerIncomplete) as incomplete:
                await tasks.echo.options(**options).trigger("never")  # type: ignore[arg-type]
            assert incomplete.value.published is False
            assert "not published; it will not start" in str(incomplete.value)
        assert await _queued(own_settings, "echo") == 1  # only the warm-up run's
        own_redis.start()
        assert [r.payload for r in (await client.list_runs()).runs] == []


async def test_a_refused_publish_fails_the_run_unless_it_started(
    settings: Settings, client: Client, worker: Worker
) -> None:
    # A queue that refuses what is over its length: the second message is nacked.
    name = client.topology.names.queue("full")
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            name,
            durable=True,
            arguments={"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "reject-publish"},
        )
        await client.connect()
        await queue.bind(client.topology.names.runs, "full")
        client.topology.declared_queues.add("full")
        try:
            refused: TriggerIncomplete | None = None
            for n in range(20):  # a quorum queue applies its limit a little late
                try:
                    await client.trigger("echo", {"value": f"v{n}"}, queue="full")
                except TriggerIncomplete as exc:
                    refused = exc
                    break
            assert refused is not None and refused.published is False
            run = await client.get_run(refused.run_id)
            assert run.status is RunStatus.FAILED
            assert run.error is not None and run.error.startswith("not published:")
        finally:
            await channel.queue_delete(name)

    # abandon applies only to runs that never started; it frees only their keys.
    done = await tasks.echo.options(idempotency_key="done").trigger("done")
    assert await done.result(timeout=10) == "done"
    fresh = NewRun("run_fresh", "echo", "echo", b'{"value":"x"}', [], "fresh", 0)
    assert [c.created for c in await client.store.create([fresh])] == [True]
    started = NewRun(done.id, "echo", "echo", b"{}", [], "done", 0)
    assert await client.store.abandon([fresh, started], "not published: test") == [True, False]
    assert (await client.get_run("run_fresh")).status is RunStatus.FAILED
    assert (await client.get_run(done.id)).status is RunStatus.COMPLETED
    keys = client.store.keys
    assert await client.redis.get(keys.idempotency("echo", "fresh")) is None
    assert await client.redis.get(keys.idempotency("echo", "done")) == done.id.encode()
    assert await client.store.abandon(
        [NewRun("run_nothing", "echo", "echo", b"{}", [], None, 0)], "x"
    ) == [False]
    assert await client.redis.exists(keys.run("run_nothing")) == 0, "no partial run hash"


async def test_a_retried_create_finds_its_own_idempotency_key(client: Client) -> None:
    run = NewRun("run_retried", "echo", "echo", b'{"value":"x"}', [], "mine", 0)
    await client.store.create([run])  # the first try, whose reply was lost
    created = await client._created(
        [run], client.store.create([run]), asyncio.get_running_loop().time() + 5, published=False
    )
    assert [(c.run_id, c.created) for c in created] == [("run_retried", True)]
