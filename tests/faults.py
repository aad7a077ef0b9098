"""Helpers for the fault tests (crash recovery, duplicates, poison messages).

Also hooks for worker processes, `conveyor worker tests.tasks tests.faults` with:
- CONVEYOR_TEST_KILL_AFTER_FINISH=1: SIGKILLs itself right after a run's COMPLETED outcome
  is written to Redis and before the message is acked: the narrowest "done but not acked"
  window;
- CONVEYOR_TEST_DELIVERIES=<file>: appends each delivery's `x-delivery-count` (0 for a first
  delivery) to the file, one per line, so a test can see how often messages came back;
- CONVEYOR_TEST_LOSE_WAKEUPS=1: the messages that wake a waiting run (a parent whose last
  child ended, a sleep's timer) are never published, as if each were lost;
- CONVEYOR_TEST_LOSE_SLOT_WAKES=1: a run that gives its concurrency slot back wakes the
  next parked run in Redis, but that run's message is never published, as if the worker
  died in between.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import aio_pika
from aiormq.exceptions import ChannelNotFoundEntity

from conveyor import Settings
from conveyor.broker.delay import LEVELS
from conveyor.broker.topology import Names
from conveyor.shared.models import RunStatus
from conveyor.shared.redis_client import redis_client
from conveyor.shared.store import Finish, RunStore
from tests.tasks import trace_key

KILL_AFTER_FINISH = "CONVEYOR_TEST_KILL_AFTER_FINISH"
DELIVERIES = "CONVEYOR_TEST_DELIVERIES"
LOSE_WAKEUPS = "CONVEYOR_TEST_LOSE_WAKEUPS"
LOSE_SLOT_WAKES = "CONVEYOR_TEST_LOSE_SLOT_WAKES"


def _install_kill_after_finish() -> None:
    original = RunStore.finish

    async def finish_then_die(self: RunStore, *args: Any, **kwargs: Any) -> Finish:
        result = await original(self, *args, **kwargs)
        if result.kind == "ok" and kwargs.get("run_status") is RunStatus.COMPLETED:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    RunStore.finish = finish_then_die  # type: ignore[method-assign]


def _install_delivery_log(path: str) -> None:
    from conveyor.worker.delivery import Delivery

    original = Delivery.__init__

    def logged(self: Delivery, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        count = self.headers.get("x-delivery-count", 0)
        with open(path, "a") as log:
            log.write(f"{count}\n")

    Delivery.__init__ = logged  # type: ignore[method-assign]


def _install_lost_wakeups() -> None:
    from conveyor.worker.worker import Worker

    async def lost(self: Worker, *args: Any, **kwargs: Any) -> None:
        return None

    Worker._publish_message = lost  # type: ignore[method-assign]


def _install_lost_slot_wakes() -> None:
    from conveyor.shared.limiter import Limiter, Wake

    original = Limiter.release_slot

    async def lost(self: Limiter, *args: Any, **kwargs: Any) -> list[Wake]:
        await original(self, *args, **kwargs)
        return []

    Limiter.release_slot = lost  # type: ignore[method-assign]


def delivery_counts(path: str) -> list[int]:
    """What a worker with the CONVEYOR_TEST_DELIVERIES hook wrote."""
    with open(path) as log:
        return [int(line) for line in log if line.strip()]


if os.environ.get(KILL_AFTER_FINISH) == "1":
    _install_kill_after_finish()
if os.environ.get(DELIVERIES):
    _install_delivery_log(os.environ[DELIVERIES])
if os.environ.get(LOSE_WAKEUPS) == "1":
    _install_lost_wakeups()
if os.environ.get(LOSE_SLOT_WAKES) == "1":
    _install_lost_slot_wakes()


async def trace(settings: Settings, run_id: str) -> list[str]:
    """The events tests/tasks.py recorded for a run, in order (`event@attempt`)."""
    r = redis_client(settings)
    try:
        events = await r.lrange(trace_key(run_id), 0, -1)
        return [e.decode() if isinstance(e, bytes) else e for e in events]
    finally:
        await r.aclose()


async def drop_traces(settings: Settings, *run_ids: str) -> None:
    r = redis_client(settings)
    try:
        await r.delete(*(trace_key(i) for i in run_ids))
    finally:
        await r.aclose()


async def queue_counts(settings: Settings, queues: list[str]) -> dict[str, tuple[int, int]]:
    """(ready messages, consumers) per full queue name; a missing queue counts (0, 0)."""
    counts: dict[str, tuple[int, int]] = {}
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        for name in queues:
            try:
                queue = await channel.declare_queue(name, passive=True)
            except ChannelNotFoundEntity:
                counts[name] = (0, 0)
                channel = await connection.channel()
                continue
            result = queue.declaration_result
            counts[name] = (result.message_count or 0, result.consumer_count or 0)
    return counts


async def wait_for_consumers(
    settings: Settings, queue: str, count: int, timeout: float = 30.0
) -> None:
    """Wait until `count` workers consume the work queue (worker processes take a moment)."""
    name = Names(settings.namespace).queue(queue)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        consumers = (await queue_counts(settings, [name]))[name][1]
        if consumers >= count:
            return
        if loop.time() > deadline:
            raise AssertionError(f"{consumers} of {count} workers consume {name} after {timeout}s")
        await asyncio.sleep(0.1)


async def pending_messages(settings: Settings, queues: list[str]) -> int:
    """Ready messages in the given work queues and anywhere on the delay ladder."""
    names = Names(settings.namespace)
    full = [names.queue(q) for q in queues] + [names.delay_level(i) for i in range(LEVELS)]
    return sum(ready for ready, _ in (await queue_counts(settings, full)).values())


def pid_of(worker_id: str) -> int:
    """The process id in a worker id (`host:pid:random`)."""
    return int(worker_id.split(":")[1])


async def drained(settings: Settings, queues: list[str]) -> bool:
    """True when no message for the queues is ready or on the delay ladder (two looks
    apart, since a message moving between ladder levels is briefly in no queue)."""
    if await pending_messages(settings, queues):
        return False
    await asyncio.sleep(0.2)
    return await pending_messages(settings, queues) == 0


async def announced_token(settings: Settings, run_id: str) -> str:
    """The id of the token a run of tests.tasks.approval announced in its trace."""
    from tests.conftest import eventually

    async def announced() -> str | None:
        events = [e for e in await trace(settings, run_id) if e.startswith("token:")]
        return events[0].split(":", 1)[1].rsplit("@", 1)[0] if events else None

    token_id: str = await eventually(announced, timeout=20)
    return token_id
