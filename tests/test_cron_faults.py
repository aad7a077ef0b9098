"""Cron ticks exactly once with real `conveyor scheduler` and worker processes: a leader
SIGKILLed and its standby SIGSTOPped during a takeover, and schedulers whose clocks are
30 s off (CONVEYOR_SCHEDULER_CLOCK_OFFSET)."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

from conveyor import Client, Settings
from tests.conftest import eventually
from tests.cron import each_tick_ran_once
from tests.test_scheduler import wait_leader

EVERY_SECOND = "* * * * * *"  # six fields: seconds first


@pytest.mark.timeout(150)
async def test_every_tick_fires_once_across_a_kill_and_a_pause(
    client: Client, settings: Settings, spawn_worker: Any, spawn_scheduler: Any
) -> None:
    spawn_worker()
    schedulers = {p.proc.pid: p for p in (spawn_scheduler(), spawn_scheduler())}
    _, first = await wait_leader(settings)
    created = await client.schedules.create("ticked", EVERY_SECOND, key="sec")
    assert created.next_at is not None
    start = created.next_at.timestamp()
    await asyncio.sleep(8)
    schedulers[first].kill(signal.SIGKILL)
    [other] = [p for pid, p in schedulers.items() if pid != first]
    other.kill(signal.SIGSTOP)
    await asyncio.sleep(3)
    other.kill(signal.SIGCONT)
    await wait_leader(settings, other_than=first)
    await asyncio.sleep(max(0.0, start + 20 - time.time()))
    await client.schedules.pause("sec")
    times = await each_tick_ran_once(client, settings, "sec", 1000)
    assert times[0] == int(start * 1000)
    assert len(times) >= 20
    # The ticks due while no scheduler led fired late, once each.
    late = [
        at
        for at in times
        if (await client.get_run(f"cron:sec:{at}")).created_at.timestamp() * 1000 - at > 1000
    ]
    assert len(late) >= 2, late


@pytest.mark.timeout(150)
@pytest.mark.parametrize("offset", [30, -30])
async def test_a_scheduler_whose_clock_is_off_neither_double_fires_nor_skips(
    client: Client, settings: Settings, spawn_worker: Any, spawn_scheduler: Any, offset: int
) -> None:
    spawn_worker()
    right = spawn_scheduler()
    await wait_leader(settings)
    created = await client.schedules.create("ticked", EVERY_SECOND, key="skew")
    assert created.next_at is not None
    off = spawn_scheduler({"CONVEYOR_SCHEDULER_CLOCK_OFFSET": str(offset)})
    await asyncio.sleep(4)
    right.kill(signal.SIGKILL)
    await wait_leader(settings, other_than=right.proc.pid)  # the one whose clock is off
    again = spawn_scheduler()
    await asyncio.sleep(8)
    off.kill(signal.SIGKILL)
    took_over = time.time()
    await wait_leader(settings, other_than=off.proc.pid)

    async def caught_up() -> bool:
        schedule = await client.schedules.get("skew")
        return (
            schedule.next_at is not None
            and schedule.next_at.timestamp() > took_over + max(offset, 0) + 2
        )

    # Ahead, the skewed leader fired ticks up to 30 s early; the right one goes on after them.
    await eventually(caught_up, timeout=60, interval=0.2)
    await client.schedules.pause("skew")
    assert again.proc.poll() is None
    times = await each_tick_ran_once(client, settings, "skew", 1000)
    assert times[0] == int(created.next_at.timestamp() * 1000)
    assert times[-1] >= int(took_over * 1000)


@pytest.mark.timeout(150)
async def test_a_leader_paused_past_its_lease_fires_nothing_twice(
    client: Client, settings: Settings, spawn_worker: Any, spawn_scheduler: Any
) -> None:
    # Two leaders at once: the paused one wakes still believing it leads.
    spawn_worker()
    schedulers = {p.proc.pid: p for p in (spawn_scheduler(), spawn_scheduler())}
    _, first = await wait_leader(settings)
    created = await client.schedules.create("ticked", EVERY_SECOND, key="paused")
    await asyncio.sleep(4)
    schedulers[first].kill(signal.SIGSTOP)
    await wait_leader(settings, other_than=first)
    await asyncio.sleep(2)
    schedulers[first].kill(signal.SIGCONT)
    await asyncio.sleep(5)
    await client.schedules.pause("paused")
    times = await each_tick_ran_once(client, settings, "paused", 1000)
    assert created.next_at is not None
    assert times[0] == int(created.next_at.timestamp() * 1000) and len(times) >= 10
    assert schedulers[first].proc.poll() is None  # it woke up and stood by
