"""A broker that blocks publishers (a resource alarm) (issue items 9 and 10).

With a memory alarm RabbitMQ stops reading from every connection that publishes, so no
confirm comes. A publish then fails at `publish_timeout` with the outcome unknown instead
of waiting for ever, and a worker whose publisher is blocked keeps acking and taking
deliveries: it publishes on a connection of its own.

The alarm is set on the shared broker (the watermark lowered to almost nothing) for a few
seconds only, and the watermark is always put back.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator

import msgspec
import pytest

from conveyor import Client, PublishFailed, RunStatus, Settings, TriggerIncomplete
from conveyor.broker.publisher import Outgoing
from conveyor.worker import Worker
from tests import tasks
from tests.conftest import eventually
from tests.test_bad_input import publish_raw

pytestmark = pytest.mark.serial

DEFAULT_WATERMARK = "0.4"  # RabbitMQ's default, as the shared broker runs


def _watermark(value: str) -> None:
    proc = subprocess.run(
        ["rabbitmqctl", "set_vm_memory_high_watermark", value],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise AssertionError(f"rabbitmqctl set_vm_memory_high_watermark failed: {proc.stderr}")


def _alarmed() -> bool:
    proc = subprocess.run(
        ["rabbitmqctl", "eval", "rabbit_alarm:get_alarms()."],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return "memory" in proc.stdout


@contextlib.asynccontextmanager
async def memory_alarm() -> AsyncIterator[None]:
    """A memory alarm on the shared broker for the duration of the block."""

    async def alarmed() -> bool:
        return await asyncio.to_thread(_alarmed)

    async def cleared() -> bool:
        return not await asyncio.to_thread(_alarmed)

    try:
        await asyncio.to_thread(_watermark, "0.000001")
        await eventually(alarmed, timeout=30, interval=0.2)
        yield
    finally:
        await asyncio.to_thread(_watermark, DEFAULT_WATERMARK)
        await eventually(cleared, timeout=30, interval=0.2)


async def test_a_publish_without_confirm_fails_at_the_timeout(
    settings: Settings, client: Client
) -> None:
    quick = msgspec.structs.replace(settings, publish_timeout=2.0)
    async with Client(settings=quick) as blocked:
        await blocked.connect()
        await blocked.publisher.ensure_queue("echo")
        async with memory_alarm():
            started = time.monotonic()
            with pytest.raises(PublishFailed, match="outcome is unknown") as failed:
                await blocked.publisher.publish([Outgoing("echo", b"{}", message_id="m1")])
            waited = time.monotonic() - started
    assert failed.value.unknown
    assert "within 2.0s" in str(failed.value)
    assert waited >= 1.9, "it waited for the confirm until publish_timeout"


async def test_a_trigger_without_confirm_says_the_run_may_start(
    settings: Settings, client: Client
) -> None:
    quick = msgspec.structs.replace(settings, publish_timeout=2.0)
    async with Client(settings=quick) as blocked:
        await tasks.echo.trigger("warm")  # connected, queue declared
        async with memory_alarm():
            with pytest.raises(TriggerIncomplete) as incomplete:
                await tasks.echo.trigger("maybe")
        assert incomplete.value.published is None
        assert "may or may not start" in str(incomplete.value)
        # Not abandoned: its message may be queued, and then it runs.
        assert await blocked.handle(incomplete.value.run_id).status() is RunStatus.QUEUED


async def test_a_blocked_publisher_does_not_stall_acks_or_deliveries(
    settings: Settings, client: Client
) -> None:
    # First in the queue: a run not due for a minute, which the worker sends round the
    # delay ladder, a publish the alarm blocks. Behind it: runs that need no publish.
    later = int(time.time() * 1000) + 60_000
    body = {"task": "echo", "payload": {"value": "later"}, "id": "later-1", "not_before": later}
    await client.connect()
    await client.publisher.ensure_queue("echo")
    await publish_raw(settings, "echo", [msgspec.json.encode(body)])
    handles = [await tasks.echo.trigger(f"v{n}") for n in range(12)]
    # Two slots and a prefetch of two: if the blocked publish held up the acks, the
    # broker would deliver at most two more messages.
    worker_settings = msgspec.structs.replace(settings, publish_timeout=5.0)
    async with memory_alarm(), Worker(tasks.ALL, settings=worker_settings, concurrency=2):

        async def all_done() -> bool:
            return all([await h.status() is RunStatus.COMPLETED for h in handles])

        await eventually(all_done, timeout=30)
        assert await client.store.status("later-1") is None, "the deferral is blocked"
