"""Runs longer than RabbitMQ's consumer_timeout complete once (issue item 6).

RabbitMQ closes a channel that holds a delivery unacked for longer than `consumer_timeout`
(30 min by default) and requeues everything the channel held. The worker's answer is the
hand-over: after `Settings.handover_after` a run's message is replaced by a delayed
watchdog copy and acked, while the lease in Redis keeps the run owned; the watchdog finds
the lease live and goes round the delay ladder again, until it finds the run ended and is
dropped.

The tests lower the timeout on the shared broker. RabbitMQ 3.10 reads `consumer_timeout`
when a channel opens and checks it on each channel tick (`channel_tick_interval`, 60 s
by default, read whenever a tick is scheduled). So the timeout is lowered only while the
worker opens its channels, which keeps channels of tests running beside these on the
normal timeout, and the tick is shortened for the test. Both are restored even on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
from collections.abc import AsyncIterator, Iterator

import msgspec
import pytest

from conveyor import Client, RunStatus, Settings
from conveyor.worker import Worker
from tests import tasks
from tests.conftest import eventually
from tests.faults import drained, trace

pytestmark = pytest.mark.serial

CONSUMER_TIMEOUT_MS = 5000
TICK_MS = 1000
# About three consumer timeouts: without a hand-over the broker would close the channel.
RUN_SECONDS = 15.0


def rabbitmqctl_eval(expression: str) -> str:
    proc = subprocess.run(
        ["rabbitmqctl", "eval", expression], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"rabbitmqctl eval {expression!r} failed (these tests need rabbitmqctl and the "
            f"right to run it against the local node): {proc.stderr or proc.stdout}"
        )
    return proc.stdout.strip()


def set_envs(values: dict[str, str]) -> dict[str, str]:
    """Set rabbit application settings in one call (rabbitmqctl is slow on a busy machine);
    returns the old values as Erlang terms (`{ok,N}` or `undefined`) for `restore_envs`."""
    sets = ", ".join(f"application:set_env(rabbit, {k}, {v})" for k, v in values.items())
    gets = ", ".join(f"application:get_env(rabbit, {k})" for k in values)
    old = rabbitmqctl_eval(f"Old = [{gets}], {sets}, Old.")
    return dict(zip(values, re.findall(r"\{ok,\d+\}|undefined", old), strict=True))


def restore_envs(old: dict[str, str]) -> None:
    actions = [
        f"application:unset_env(rabbit, {k})"
        if raw == "undefined"
        else f"application:set_env(rabbit, {k}, {raw[4:-1]})"
        for k, raw in old.items()
    ]
    rabbitmqctl_eval(", ".join(actions) + ".")


@pytest.fixture
def short_consumer_timeout() -> Iterator[dict[str, str]]:
    """A consumer_timeout of CONSUMER_TIMEOUT_MS for channels opened until the test
    restores it (call `restore_envs` on the yielded dict once the worker is up), and
    channel ticks every second so that the broker checks the timeout promptly."""
    old = set_envs(
        {"consumer_timeout": str(CONSUMER_TIMEOUT_MS), "channel_tick_interval": str(TICK_MS)}
    )
    try:
        yield {"consumer_timeout": old["consumer_timeout"]}
    finally:
        restore_envs(old)


@contextlib.asynccontextmanager
async def worker_with(
    settings: Settings, lowered: dict[str, str], concurrency: int = 4, **overrides: float
) -> AsyncIterator[Worker]:
    """An in-process worker whose channels have the short consumer timeout; the timeout is
    restored as soon as they are open, so other channels keep the normal one."""
    w = Worker(
        tasks.ALL, settings=msgspec.structs.replace(settings, **overrides), concurrency=concurrency
    )
    try:
        await w.start()
    finally:
        await asyncio.to_thread(restore_envs, lowered)
    try:
        yield w
    finally:
        await w.shutdown()


def channel_closes(worker: Worker) -> list[BaseException | None]:
    """Records every close of the worker's consumer channel (the robust channel reopens)."""
    closes: list[BaseException | None] = []
    queue, _ = worker._consumers[0]
    queue.channel.close_callbacks.add(lambda _channel, exc=None: closes.append(exc))
    return closes


async def test_run_past_consumer_timeout_completes_once_with_hand_over(
    short_consumer_timeout: dict[str, str], settings: Settings, client: Client
) -> None:
    async with worker_with(settings, short_consumer_timeout, handover_after=1.5) as worker:
        closes = channel_closes(worker)
        handle = await tasks.sleeper.trigger(RUN_SECONDS)

        async def handed_over() -> bool:
            execution = worker.inflight.get((handle.id, 1))
            return execution is not None and execution.handed_over

        await eventually(handed_over, timeout=10)
        assert await handle.result(timeout=RUN_SECONDS + 15) == "slept"
        # The broker never timed the delivery out: the message was acked at the hand-over.
        assert closes == []
        run = await client.get_run(handle.id)
        assert run.status is RunStatus.COMPLETED
        assert [a.status for a in run.attempts] == ["COMPLETED"]
        assert await trace(settings, handle.id) == ["sleeper:start@1", "sleeper:end@1"]
        # The watchdog copy finds the run ended and is dropped: nothing is left anywhere.
        await eventually(lambda: drained(settings, [tasks.sleeper.queue]), timeout=10, interval=0.3)
        assert worker.inflight == {}


async def test_run_past_consumer_timeout_without_hand_over_still_completes_once(
    short_consumer_timeout: dict[str, str], settings: Settings, client: Client
) -> None:
    """With the hand-over effectively off, the broker does close the channel and requeue
    the delivery; the redelivery finds the lease live and is deferred, the run goes on,
    and its late ack on the dead channel is harmless. (RabbitMQ 3.10 often sends that
    Channel.Close twice, and the second one makes it close the whole connection with
    COMMAND_INVALID; the robust connection then reconnects after 5 s. The run must go on
    through that too: aiormq cancels the consumer callbacks of a closed channel, so the
    worker runs each message in a task of its own.)"""
    async with worker_with(settings, short_consumer_timeout, handover_after=3600.0) as worker:
        closes = channel_closes(worker)
        # Twice the timeout is enough to see the broker close the channel once.
        handle = await tasks.sleeper.trigger(2 * CONSUMER_TIMEOUT_MS / 1000)
        assert await handle.result(timeout=25) == "slept"
        assert closes, "the broker should have closed the channel past consumer_timeout"
        assert "delivery acknowledgement" in str(closes[0])
        run = await client.get_run(handle.id)
        assert [a.status for a in run.attempts] == ["COMPLETED"]
        assert await trace(settings, handle.id) == ["sleeper:start@1", "sleeper:end@1"]
        await eventually(lambda: drained(settings, [tasks.sleeper.queue]), timeout=10, interval=0.3)


async def test_messages_waiting_behind_a_long_run_are_not_timed_out(
    short_consumer_timeout: dict[str, str], settings: Settings, client: Client
) -> None:
    """Once a long run's message is handed over, the broker sends the next one, which
    waits for the busy worker's only slot. It goes round the delay ladder after
    handover_after instead of sitting unacked until consumer_timeout closes the channel."""
    async with worker_with(
        settings, short_consumer_timeout, concurrency=1, handover_after=1.0
    ) as worker:
        closes = channel_closes(worker)
        long = await tasks.sleeper.trigger(3 * CONSUMER_TIMEOUT_MS / 1000)
        await eventually(lambda: _started(settings, long.id), timeout=10)
        short = await tasks.echo.trigger("after")
        assert await long.result(timeout=40) == "slept"
        assert await short.result(timeout=20) == "after"
        assert closes == [], "a delivery waiting for a slot was timed out by the broker"
        run = await client.get_run(short.id)
        assert [a.status for a in run.attempts] == ["COMPLETED"]
        queues = [tasks.sleeper.queue, tasks.echo.queue]
        await eventually(lambda: drained(settings, queues), timeout=10, interval=0.3)


async def _started(settings: Settings, run_id: str) -> bool:
    return "sleeper:start@1" in await trace(settings, run_id)
