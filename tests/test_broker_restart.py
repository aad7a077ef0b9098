"""A RabbitMQ restart while a worker runs (issue item 13).

`rabbitmqctl stop_app && rabbitmqctl start_app` drops every connection. The worker's
robust connection reconnects and restores its channels, queues, bindings and consumers;
runs in flight keep going (their leases are in Redis) and their late acks on the dead
channels are harmless, since the broker requeued those messages and the redeliveries find
the runs ended; triggers made while the broker is down wait and are published once it is
back. Every run triggered before, during and after the restart completes, each once.

The broker is shared with tests running beside this one, so it is down only for as long
as the test needs, and it is always started again.
"""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

import pytest

from conveyor import Client, RunHandle, RunStatus, Settings
from tests import tasks
from tests.conftest import eventually
from tests.faults import drained, trace, wait_for_consumers

pytestmark = pytest.mark.serial


def rabbitmqctl(*args: str) -> None:
    proc = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(
            f"rabbitmqctl {' '.join(args)} failed (this test needs rabbitmqctl and the right "
            f"to run it against the local node): {proc.stderr or proc.stdout}"
        )


async def test_worker_reconnects_and_runs_triggered_before_during_and_after_complete(
    settings: Settings, client: Client, spawn_worker: Any
) -> None:
    spawn_worker("--concurrency", "10")
    await wait_for_consumers(settings, tasks.three_steps.queue, 1)
    # Runs in step 2 when the broker goes away: one ends while it is down, one most likely
    # after the worker has reconnected (its redelivery then finds the lease live and waits
    # on the delay ladder); and one run that is long done.
    in_flight = [await tasks.three_steps.trigger(seconds=s) for s in (2.0, 12.0)]
    done_before = await tasks.echo.trigger("before")
    assert await done_before.result(timeout=10) == "before"

    async def in_step_two() -> bool:
        traces = [await trace(settings, h.id) for h in in_flight]
        return all("s2:start@1" in t for t in traces)

    await eventually(in_step_two, timeout=15)

    during: list[asyncio.Task[RunHandle[Any]]] = []
    try:
        await asyncio.to_thread(rabbitmqctl, "stop_app")
        during = [
            asyncio.create_task(tasks.echo.trigger("during")),
            asyncio.create_task(tasks.three_steps.trigger(seconds=0.1)),
        ]
        await asyncio.sleep(0.5)
        assert not any(t.done() for t in during), "a trigger returned while the broker was down"
    finally:
        await asyncio.to_thread(rabbitmqctl, "start_app")
        await asyncio.to_thread(rabbitmqctl, "await_startup")

    # The publisher retries until publish_timeout (30 s here): the triggers went through.
    echo_during, steps_during = await asyncio.wait_for(asyncio.gather(*during), timeout=40)
    # The worker is consuming again (its consumers were restored on the new connection).
    await wait_for_consumers(settings, tasks.echo.queue, 1)
    after = await tasks.echo.trigger("after")

    assert await echo_during.result(timeout=30) == "during"
    assert await after.result(timeout=30) == "after"
    assert await steps_during.result(timeout=30) == ["s1", "s2", "s3"]
    for handle in in_flight:
        assert await handle.result(timeout=30) == ["s1", "s2", "s3"]

    # Each run executed once: the in-flight ones went on through the restart.
    for handle in [*in_flight, steps_during]:
        run = await client.get_run(handle.id)
        assert run.status is RunStatus.COMPLETED
        assert [a.status for a in run.attempts] == ["COMPLETED"]
        assert await trace(settings, handle.id) == [
            f"{step}:{edge}@1" for step in ("s1", "s2", "s3") for edge in ("start", "end")
        ]
    for handle in (done_before, echo_during, after):
        assert [a.status for a in (await client.get_run(handle.id)).attempts] == ["COMPLETED"]
    # The requeued deliveries of the in-flight runs found them ended and were dropped.
    await eventually(
        lambda: drained(settings, [tasks.three_steps.queue, tasks.echo.queue]),
        timeout=15,
        interval=0.3,
    )


async def test_leases_hold_while_the_broker_is_stopped_for_longer_than_a_lease(
    settings: Settings, client: Client, spawn_worker: Any
) -> None:
    # Renewals need Redis alone: a broker down for 15 s, more than the 10 s lease, takes no
    # run from its worker, though both workers get the runs' messages again afterwards.
    lease = {"CONVEYOR_LEASE_TTL": "10"}
    spawn_worker("--concurrency", "2", env=lease)
    spawn_worker("--concurrency", "2", env=lease)
    await wait_for_consumers(settings, tasks.three_steps.queue, 2)
    handles = [await tasks.three_steps.trigger(seconds=22.0) for _ in range(4)]

    async def all_in_step_two() -> bool:
        traces = [await trace(settings, h.id) for h in handles]
        return all(t[2:3] == ["s2:start@1"] for t in traces)

    await eventually(all_in_step_two, timeout=20)
    try:
        await asyncio.to_thread(rabbitmqctl, "stop_app")
        await asyncio.sleep(15)
    finally:
        await asyncio.to_thread(rabbitmqctl, "start_app")
        await asyncio.to_thread(rabbitmqctl, "await_startup")

    for handle in handles:
        assert await handle.result(timeout=40) == ["s1", "s2", "s3"]
        run = await client.get_run(handle.id)
        assert [a.status for a in run.attempts] == ["COMPLETED"]
        assert await client.redis.hget(client.store.keys.run(handle.id), "crashes") == b"0"
        assert await trace(settings, handle.id) == [
            f"{step}:{edge}@1" for step in ("s1", "s2", "s3") for edge in ("start", "end")
        ]
