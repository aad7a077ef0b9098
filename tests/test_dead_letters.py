"""Dead letters (issue 7 items 6 and 7): a dead-lettered message ends its run with the
reason, and `conveyor dead list/replay/purge` show and act on what was dead-lettered."""

from __future__ import annotations

from typing import Any

import aio_pika
import msgspec
import pytest

from conveyor import Client, RunStatus, Settings
from conveyor.broker.topology import Names
from conveyor.worker import Worker
from tests import tasks
from tests.conftest import eventually
from tests.test_cli import conveyor

DELIVERY_LIMIT = 2
# The command line declares work queues as workers do, so it needs the same limit.
CLI_ENV = {"CONVEYOR_DELIVERY_LIMIT": str(DELIVERY_LIMIT)}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # A low delivery limit, so that RabbitMQ dead-letters a message after a few rejects.
    return msgspec.structs.replace(settings, delivery_limit=DELIVERY_LIMIT)


async def reject_until_dead_lettered(settings: Settings, queue: str) -> None:
    """Requeue the work queue's message until RabbitMQ dead-letters it at the limit."""
    names = Names(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        work = await channel.declare_queue(names.queue(queue), passive=True)
        for _ in range(DELIVERY_LIMIT + 5):
            message = await work.get(fail=False, timeout=5)
            if message is None:
                break
            await message.nack(requeue=True)
        assert (await work.declare()).message_count == 0


async def publish_dead(settings: Settings, body: bytes, headers: dict[str, Any]) -> None:
    """A dead letter as a worker publishes it (worker/worker.py `_dead_letter`)."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(Names(settings.namespace).dead)
        await exchange.publish(aio_pika.Message(body, headers=headers), routing_key="")


async def status_of(client: Client, run_id: str) -> RunStatus:
    return (await client.get_run(run_id)).status


async def test_the_scheduler_ends_dead_lettered_runs(
    client: Client, settings: Settings, spawn_scheduler: Any
) -> None:
    at_limit = await client.trigger("echo", {"value": "x"})
    await reject_until_dead_lettered(settings, "echo")
    sent_by_worker = await client.trigger("echo", {"value": "y"})
    await publish_dead(
        settings,
        b'{"task": "echo"}',
        {
            "x-conveyor-reason": "unknown task 'echo'",
            "x-conveyor-queue": "echo",
            "x-conveyor-run-id": sent_by_worker.id,
        },
    )
    spawn_scheduler()

    async def both_failed() -> bool:
        statuses = [await status_of(client, h.id) for h in (at_limit, sent_by_worker)]
        return statuses == [RunStatus.FAILED, RunStatus.FAILED]

    await eventually(both_failed, timeout=20)
    assert (await client.get_run(at_limit.id)).error == "delivery_limit"
    assert (await client.get_run(sent_by_worker.id)).error == "unknown task 'echo'"


async def test_a_crashed_run_stays_crashed(client: Client, settings: Settings) -> None:
    handle = await client.trigger("echo", {"value": "x"})
    await client.redis.hset(client.store.keys.run(handle.id), "status", "CRASHED")
    await publish_dead(
        settings, b"{}", {"x-conveyor-reason": "died 3 times", "x-conveyor-run-id": handle.id}
    )
    listed = (await conveyor(settings, "dead", "list", "--json", env=CLI_ENV)).json()
    assert [d["run_id"] for d in listed] == [handle.id]
    assert await status_of(client, handle.id) is RunStatus.CRASHED


async def test_dead_list_replay_and_purge(
    client: Client, settings: Settings, worker: Worker
) -> None:
    await worker.shutdown()  # nothing consumes until the replay
    handle = await client.trigger("echo", {"value": "again"})
    await reject_until_dead_lettered(settings, "echo")
    await publish_dead(
        settings,
        b"not json",
        {"x-conveyor-reason": "invalid message body: bad", "x-conveyor-queue": "echo"},
    )

    listed = (await conveyor(settings, "dead", "list", "--json", env=CLI_ENV)).json()
    assert len(listed) == 2
    bad, at_limit = listed  # newest first
    assert (bad["reason"], bad["queue"], bad["task"], bad["run_id"], bad["body"]) == (
        "invalid message body: bad",
        "echo",
        None,
        None,
        "not json",
    )
    assert (at_limit["reason"], at_limit["queue"], at_limit["task"], at_limit["run_id"]) == (
        "delivery_limit",
        "echo",
        "echo",
        handle.id,
    )
    assert at_limit["at"] > 0
    run = await client.get_run(handle.id)
    assert (run.status, run.error) == (RunStatus.FAILED, "delivery_limit")

    text = await conveyor(settings, "dead", "list", "--limit", "1", env=CLI_ENV)
    assert text.code == 0 and bad["id"] in text.out and at_limit["id"] not in text.out

    replayed = await conveyor(settings, "dead", "replay", at_limit["id"], env=CLI_ENV)
    assert replayed.code == 0, replayed.err
    assert f"replayed {at_limit['id']} to queue echo" in replayed.out
    assert await status_of(client, handle.id) is RunStatus.QUEUED
    again = Worker(tasks.ALL, settings=settings, concurrency=5)
    await again.start()
    try:
        assert await client.handle(handle.id).result(timeout=20) == "again"
    finally:
        await again.shutdown()

    missing = await conveyor(settings, "dead", "replay", "nope", env=CLI_ENV)
    assert missing.code == 1 and "no dead letter nope" in missing.err
    every = await conveyor(settings, "dead", "replay", "--all", "--json", env=CLI_ENV)
    assert every.json() == [bad["id"]]
    assert (await conveyor(settings, "dead", "list", env=CLI_ENV)).out == "no dead letters"

    # purge also takes what waits in the dead-letter queue
    await publish_dead(settings, b"{}", {"x-conveyor-reason": "r", "x-conveyor-queue": "echo"})
    purged = await conveyor(settings, "dead", "purge", "--json", env=CLI_ENV)
    assert purged.json() == {"purged": 1}
    assert (await conveyor(settings, "dead", "list", "--json", env=CLI_ENV)).json() == []


async def test_a_body_too_large_for_any_worker_is_not_kept(
    client: Client, settings: Settings
) -> None:
    await client.connect()  # declares {ns}.dead
    body = b'{"task": "echo", "payload": {"value": "' + b"x" * 70_000 + b'"}}'
    await publish_dead(settings, body, {"x-conveyor-reason": "too big", "x-conveyor-queue": "echo"})
    env = {**CLI_ENV, "CONVEYOR_MAX_PAYLOAD_BYTES": "1000"}
    [record] = (await conveyor(settings, "dead", "list", "--json", env=env)).json()
    assert (record["size"], record["body_kept"], record["body"]) == (len(body), False, "")
    refused = await conveyor(settings, "dead", "replay", record["id"], env=env)
    assert refused.code == 1 and "too large for any worker" in refused.err
