"""The scheduler (issue 7 item 6): a fenced leader lease and the reaper, with real
`conveyor scheduler` processes killed with SIGKILL and paused with SIGSTOP."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import aio_pika
import pytest

from conveyor import Client, RunStatus, Settings
from conveyor.broker.delay import LEVELS
from conveyor.broker.topology import Names
from conveyor.scheduler.lease import Lease, Refused
from conveyor.scheduler.reaper import Reaper
from conveyor.scheduler.runtime import Runtime
from conveyor.shared.ids import new_run_id
from conveyor.shared.redis_client import redis_client
from conveyor.shared.store import NewRun
from conveyor.worker import Worker
from tests.conftest import SCHEDULER_ENV, SchedulerProcess, eventually
from tests.faults import trace

LEASE_TTL = float(SCHEDULER_ENV["CONVEYOR_SCHEDULER_LEASE_TTL"])
ONCE = ["s1:start@1", "s1:end@1", "s2:start@1", "s2:end@1", "s3:start@1", "s3:end@1"]


def stranded(n: int, *, delay_ms: int = 0) -> list[NewRun]:
    """Runs of three-steps as a client killed between create and publish leaves them."""
    return [
        NewRun(new_run_id(), "three-steps", "three-steps", b'{"seconds": 0.01}', [], None, delay_ms)
        for _ in range(n)
    ]


async def completed_once(client: Client, settings: Settings, run_ids: list[str]) -> None:
    async def all_done() -> bool:
        states = await client.store.states(run_ids)
        return all(s is not None and s.status is RunStatus.COMPLETED for s in states)

    await eventually(all_done, timeout=40, interval=0.2)
    for run_id in run_ids:
        assert await trace(settings, run_id) == ONCE, run_id


async def leader(settings: Settings) -> tuple[int, int]:
    """(epoch, pid) of the scheduler holding the lease, (0, 0) if none."""
    r = redis_client(settings)
    try:
        raw = await r.get(Runtime(settings, "test").keys.leader)
    finally:
        await r.aclose()
    if raw is None:
        return 0, 0
    epoch, holder = raw.decode().split(":", 1)
    return int(epoch), int(holder.split(":")[1])


async def wait_leader(settings: Settings, other_than: int = 0) -> tuple[int, int]:
    async def found() -> tuple[int, int] | None:
        epoch, pid = await leader(settings)
        return (epoch, pid) if pid and pid != other_than else None

    result: tuple[int, int] = await eventually(found, timeout=30, interval=0.05)
    return result


async def test_runs_created_without_a_message_complete(
    client: Client, settings: Settings, worker: Worker, spawn_scheduler: Any
) -> None:
    runs = stranded(20) + stranded(5, delay_ms=500)
    created = await client.store.create(runs)
    assert all(c.created for c in created)
    spawn_scheduler()
    await completed_once(client, settings, [r.run_id for r in runs])


async def test_a_delayed_run_whose_message_left_the_ladder_completes(
    client: Client, settings: Settings, worker: Worker, spawn_scheduler: Any
) -> None:
    from tests import tasks

    handle = await tasks.three_steps.options(delay=1.5).trigger(seconds=0.01)
    names = Names(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        purged = 0
        for level in range(LEVELS):
            queue = await channel.declare_queue(names.delay_level(level), passive=True)
            purged += (await queue.purge()).message_count or 0
    assert purged == 1  # the run's only message is gone
    spawn_scheduler()
    await completed_once(client, settings, [handle.id])


async def test_a_standby_takes_over_from_a_killed_leader(
    client: Client, settings: Settings, worker: Worker, spawn_scheduler: Any
) -> None:
    first = [spawn_scheduler(), spawn_scheduler()]
    epoch, pid = await wait_leader(settings)
    [victim] = [s for s in first if s.proc.pid == pid]
    victim.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    new_epoch, new_pid = await wait_leader(settings, other_than=pid)
    took = time.monotonic() - killed_at
    assert new_epoch == epoch + 1 and new_pid != pid
    # The lease expires at most one TTL after the last renewal; a standby polls every tenth.
    assert took < LEASE_TTL * 1.1 + 1.0, took  # a second's slack for a loaded machine
    runs = stranded(10)
    await client.store.create(runs)
    await completed_once(client, settings, [r.run_id for r in runs])


async def test_a_paused_leader_writes_nothing_when_it_resumes(
    client: Client, settings: Settings, worker: Worker, spawn_scheduler: Any
) -> None:
    schedulers: list[SchedulerProcess] = [spawn_scheduler(), spawn_scheduler()]
    epoch, pid = await wait_leader(settings)
    [paused] = [s for s in schedulers if s.proc.pid == pid]

    async def told() -> bool:
        return "leads" in paused.output()

    # Paused only once it said so, else its own "leads" would be printed after it resumes.
    await eventually(told, timeout=10)
    paused.kill(signal.SIGSTOP)
    try:
        new_epoch, _ = await wait_leader(settings, other_than=pid)
        assert new_epoch == epoch + 1
        # Runs stranded while the old leader sleeps: the new one repairs them.
        runs = stranded(10)
        await client.store.create(runs)
        await completed_once(client, settings, [r.run_id for r in runs])
        # More runs stranded just before it wakes up, so that it finds work it must not do.
        late = stranded(10)
        await client.store.create(late)
        resumed_at = len(paused.output())
    finally:
        paused.kill(signal.SIGCONT)

    async def noticed() -> bool:
        return "lost the leader lease" in paused.output()[resumed_at:]

    await eventually(noticed, timeout=10)
    await completed_once(client, settings, [r.run_id for r in late])
    after = paused.output()[resumed_at:]
    assert "republished" not in after and "leads" not in after, after
    assert (await leader(settings))[0] == new_epoch


async def test_fenced_writes_of_a_lost_lease_are_refused(
    settings: Settings, client: Client
) -> None:
    """The fence itself, without timing: a leader whose lease another epoch took writes
    nothing to the due index or the dead-letter records, even if it still thinks it leads."""
    old, new = Runtime(settings, "old"), Runtime(settings, "new")
    try:
        stale = Lease(old.scripts, old.keys, "old", 0.3)
        assert await stale.acquire()
        await asyncio.sleep(0.5)  # its key expires, as it would while the process is stopped
        current = Lease(new.scripts, new.keys, "new", 10)
        assert await current.acquire() and current.epoch == stale.epoch + 1
        await old.redis.zadd(old.keys.due, {"some-run": 1})
        stale.held = lambda: True  # type: ignore[method-assign]  # believes it still leads
        reaper = Reaper(old, stale)
        with pytest.raises(Refused):
            await reaper._write(["some-run"], [])
        assert await old.redis.zscore(old.keys.due, "some-run") == 1
        refused = await old.scripts.call(
            "dead_add",
            [old.keys.leader, old.keys.dead, old.keys.dead_index],
            [stale.token, "x", b"{}", 10],
        )
        assert refused == -1 and not await old.redis.exists(old.keys.dead)
        assert not await stale.renew() and not stale.epoch
    finally:
        await old.close()
        await new.close()


async def test_an_idempotency_hit_on_a_run_that_never_started_publishes_it(
    client: Client, settings: Settings, worker: Worker
) -> None:
    [run] = stranded(1)
    run = NewRun(run.run_id, "echo", "echo", b'{"value": "v"}', [], "key-1", 0)
    assert [c.created for c in await client.store.create([run])] == [True]
    handle = await client.trigger("echo", {"value": "other"}, idempotency_key="key-1")
    assert handle.id == run.run_id
    assert await handle.result(timeout=20) == "v"


async def test_sigterm_gives_the_lease_up(settings: Settings, spawn_scheduler: Any) -> None:
    schedulers: list[SchedulerProcess] = [spawn_scheduler(), spawn_scheduler()]
    epoch, pid = await wait_leader(settings)
    [leading] = [s for s in schedulers if s.proc.pid == pid]
    leading.kill(signal.SIGTERM)
    stopped_at = time.monotonic()
    assert await asyncio.to_thread(leading.wait, 15) == 0
    new_epoch, _ = await wait_leader(settings, other_than=pid)
    # Released, not expired: the standby's next try (a tenth of the TTL) takes it.
    assert new_epoch == epoch + 1
    assert time.monotonic() - stopped_at < LEASE_TTL, "the lease was not released"


async def test_an_executing_run_whose_worker_and_message_are_gone_resumes(
    client: Client, settings: Settings, worker: Worker, spawn_scheduler: Any
) -> None:
    """A worker died mid-run after its message was acked (a hand-over whose watchdog copy
    was lost): the run is EXECUTING under an expired lease with nothing to move it."""
    [run] = stranded(1)
    await client.store.create([run])
    await client.redis.hset(
        client.store.keys.run(run.run_id),
        mapping={"status": "EXECUTING", "attempt": 1, "worker": "gone:1:x", "lease_until": 1},
    )
    spawn_scheduler()

    async def completed() -> bool:
        return (await client.get_run(run.run_id)).status is RunStatus.COMPLETED

    await eventually(completed, timeout=30, interval=0.2)
    assert await trace(settings, run.run_id) == [e.replace("@1", "@2") for e in ONCE]
    assert int(await client.redis.hget(client.store.keys.run(run.run_id), "crashes") or 0) == 1
