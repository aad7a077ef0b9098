"""Schedules through the client API and the CLI, and the ticker's rules run in-process
against the real services: catch-up window, a tick fired twice, fencing, scheduled_at."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from conveyor import Client, InvalidSchedule, RunStatus, ScheduleNotFound, Settings
from conveyor.scheduler import cron
from conveyor.scheduler.cron import Ticker
from conveyor.scheduler.lease import Lease, Refused
from conveyor.scheduler.reaper import Reaper
from conveyor.scheduler.runtime import Runtime
from conveyor.shared.cron import tick_run_id
from conveyor.shared.schedules import make_record
from conveyor.shared.store import NewRun
from conveyor.worker import Worker
from tests.conftest import SCHEDULER_ENV, ConveyorProcess, eventually
from tests.cron import each_tick_ran_once
from tests.test_cli import conveyor


async def test_client_round_trip(client: Client) -> None:
    s = await client.schedules.create(
        "echo", "0 9 * * 1-5", timezone="Europe/Paris", payload={"value": "hi"}, key="morning"
    )
    assert (s.key, s.cron, s.timezone, s.payload, s.paused) == (
        "morning",
        "0 9 * * 1-5",
        "Europe/Paris",
        {"value": "hi"},
        False,
    )
    assert s.next_at is not None and s.next_at.astimezone().minute == 0
    # The same key again updates it.
    s2 = await client.schedules.create("echo", "*/5 * * * *", payload={"value": "x"}, key="morning")
    assert (s2.cron, s2.timezone, s2.payload) == ("*/5 * * * *", "UTC", {"value": "x"})
    # No key: the same schedule created twice is one.
    a = await client.schedules.create("noop", every=timedelta(minutes=1))
    b = await client.schedules.create("noop", every=timedelta(minutes=1))
    assert a.key == b.key and a.every == timedelta(minutes=1)
    assert [x.key for x in await client.schedules.list()] == sorted([a.key, "morning"])

    paused = await client.schedules.pause("morning")
    assert paused.paused and paused.next_at is None
    # Updating a paused schedule leaves it paused.
    still = await client.schedules.create("echo", "*/10 * * * *", key="morning")
    assert still.paused and still.cron == "*/10 * * * *"
    resumed = await client.schedules.resume("morning")
    assert not resumed.paused and resumed.next_at is not None
    assert (await client.schedules.get("morning")).next_at == resumed.next_at

    await client.schedules.delete("morning")
    with pytest.raises(ScheduleNotFound, match="morning"):
        await client.schedules.get("morning")
    with pytest.raises(ScheduleNotFound):
        await client.schedules.delete("morning")
    with pytest.raises(InvalidSchedule, match="Mars/Olympus"):
        await client.schedules.create("echo", "* * * * *", timezone="Mars/Olympus")
    with pytest.raises(InvalidSchedule, match="expression"):
        await client.schedules.create("echo", "every day")


async def test_cli_round_trip(settings: Settings, client: Client) -> None:
    made = await conveyor(
        settings, "schedules", "create", "echo", "--cron", "*/15 * * * * *",
        "--payload", '{"value": "v"}', "--key", "quarter", "--json",
    )  # fmt: skip
    data = made.json()
    assert (data["key"], data["cron"], data["payload"]) == (
        "quarter",
        "*/15 * * * * *",
        {"value": "v"},
    )
    listed = await conveyor(settings, "schedules", "list", "--json")
    assert [s["key"] for s in listed.json()] == ["quarter"]
    assert (await conveyor(settings, "schedules", "pause", "quarter", "--json")).json()["paused"]
    text = await conveyor(settings, "schedules", "list")
    assert "quarter" in text.out and "paused" in text.out
    assert not (await conveyor(settings, "schedules", "resume", "quarter", "--json")).json()[
        "paused"
    ]
    shown = await conveyor(settings, "schedules", "show", "quarter", "--json")
    assert shown.json()["next_at"] is not None
    assert (await conveyor(settings, "schedules", "delete", "quarter")).out == "deleted quarter"
    assert (await conveyor(settings, "schedules", "list")).out == "no schedules"
    bad = await conveyor(settings, "schedules", "create", "echo", "--cron", "99 * * * *")
    assert bad.code == 1 and "invalid schedule expression" in bad.err
    zone = await conveyor(
        settings, "schedules", "create", "echo", "--cron", "* * * * *", "--timezone", "Nowhere"
    )
    assert zone.code == 1 and "unknown time zone 'Nowhere'" in zone.err
    missing = await conveyor(settings, "schedules", "pause", "nope")
    assert missing.code == 1 and "no schedule 'nope'" in missing.err


class Leader:
    """A ticker in this process holding the lease."""

    def __init__(self, settings: Settings) -> None:
        self.runtime = Runtime(settings, "test-ticker")
        self.lease = Lease(self.runtime.scripts, self.runtime.keys, "test:1:a", 10.0)
        self.ticker = Ticker(self.runtime, self.lease)

    async def __aenter__(self) -> Leader:
        await self.runtime.connect()
        assert await self.lease.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.lease.release()
        await self.runtime.close()


async def put_due(leader: Leader, key: str, record: Any, due_ms: int) -> None:
    """A schedule whose next tick is `due_ms`, as one left behind while no scheduler led."""
    store = leader.ticker.schedules
    await store.put(key, record)
    await leader.runtime.redis.zadd(leader.runtime.keys.schedules_due, {key: due_ms})


async def test_missed_ticks_fire_once_within_the_catch_up_window(
    settings: Settings, client: Client, worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    settings = msgspec.structs.replace(settings, cron_catch_up=30.0)
    async with Leader(settings) as leader:
        now = await leader.ticker.now_ms()
        start = (now - 45_000) // 1000 * 1000
        await put_due(
            leader, "back", make_record("ticked", None, every=timedelta(seconds=1)), start
        )
        await leader.ticker.tick()
        after = await leader.ticker.now_ms()
        assert leader.ticker.skipped == 1
        assert "older than the catch-up window" in caplog.text
        times = await each_tick_ran_once(client, settings, "back", 1000)
        # The ticks of the last 30 s (of the pass's clock) fired; the 15 s before them did not.
        assert now - 30_000 <= times[0] <= after - 29_000
        assert times[-1] >= now - 1000
        # The schedule goes on from the tick after the last one fired.
        due = await leader.runtime.redis.zscore(leader.runtime.keys.schedules_due, "back")
        assert due == times[-1] + 1000


async def test_a_tick_fired_twice_is_one_run(
    settings: Settings, client: Client, worker: Worker
) -> None:
    async with Leader(settings) as leader:
        now = await leader.ticker.now_ms()
        start = (now - 5000) // 1000 * 1000
        await put_due(
            leader, "twice", make_record("ticked", None, every=timedelta(seconds=1)), start
        )
        due = [("twice", start)]
        # The first pass's reply lost: the same pass again, as a new leader would make it.
        await leader.ticker._fire(due, now)
        await leader.ticker._fire(due, now)
        times = await each_tick_ran_once(client, settings, "twice", 1000)
        assert times[0] == start and len(times) == 6


async def test_a_leader_that_lost_the_lease_moves_nothing(
    settings: Settings, client: Client
) -> None:
    async with Leader(settings) as leader:
        now = await leader.ticker.now_ms()
        await put_due(
            leader, "fenced", make_record("ticked", None, every=timedelta(seconds=1)), now - 2000
        )
        # Another scheduler took the lease while this one was paused.
        await leader.runtime.redis.set(leader.runtime.keys.leader, "99:other:1:b")
        with pytest.raises(Refused):
            await leader.ticker._fire([("fenced", now - 2000)], now)
        assert (
            await leader.runtime.redis.zscore(leader.runtime.keys.schedules_due, "fenced")
            == now - 2000
        )
        leader.lease.lose()


async def test_declared_schedules_fire(
    settings: Settings, client: Client, spawn_worker: Any, tmp_path: Path
) -> None:
    spawn_worker("tests.cron_tasks")
    scheduler = ConveyorProcess(
        ["scheduler", "tests.cron_tasks"], settings, SCHEDULER_ENV, tmp_path / "scheduler.log"
    )
    try:

        async def fired() -> list[Any]:
            runs = (
                await client.list_runs(task_id="declared-tick", status=RunStatus.COMPLETED)
            ).runs
            return runs if {r.output[0] for r in runs} == {"two", "every"} else []

        runs = await eventually(fired, timeout=30, interval=0.2)
        for run in runs:
            key = "declared-two" if run.output[0] == "two" else "declared-tick:1"
            at = run.output[1]
            assert run.id == f"cron:{key}:{at}"
            assert at % (2000 if key == "declared-two" else 3000) == 0
        listed = {s.key: s for s in await client.schedules.list()}
        assert set(listed) == {"declared-two", "declared-tick:1"}
        assert listed["declared-two"].declared and listed["declared-two"].payload == {
            "label": "two"
        }
        assert listed["declared-tick:1"].every == timedelta(seconds=3)
    finally:
        scheduler.kill()
        scheduler.wait()
    assert "registered 2 declared schedules (2 changed)" in scheduler.output()


async def test_registration_keeps_unchanged_schedules_and_drops_removed_ones(
    settings: Settings, client: Client
) -> None:
    async with Leader(settings) as leader:
        store = leader.ticker.schedules
        one = make_record("echo", "*/5 * * * *", payload={"value": "a"}, declared=True)
        two = make_record("echo", None, every=timedelta(minutes=1), declared=True)
        assert await store.register([("echo:0", one), ("echo:1", two)], ["echo", "noop"]) == 2
        await client.schedules.create("echo", "0 * * * *", key="by-api")
        await leader.runtime.redis.zadd(leader.runtime.keys.schedules_due, {"echo:0": 1000})
        # Declared again, unchanged: its next fire time stays; echo:1 is no longer declared.
        assert await store.register([("echo:0", one)], ["echo"]) == 1
        assert (
            await leader.runtime.redis.zscore(leader.runtime.keys.schedules_due, "echo:0") == 1000
        )
        assert [s.key for s in await client.schedules.list()] == ["by-api", "echo:0"]


async def test_a_tick_run_republished_by_the_reaper_keeps_its_time(
    settings: Settings, client: Client, worker: Worker
) -> None:
    # A leader killed between the create and the publish: the reaper publishes the run
    # from its hash, which has the scheduled time the create wrote.
    settings = msgspec.structs.replace(settings, reap_after=0.2)
    at = (await client.schedules._store.now_ms()) // 1000 * 1000
    run_id = tick_run_id("lost", at)
    new = NewRun(run_id, "ticked", "ticked", b"{}", [], None, 0, scheduled_at=at)
    await client.store.create([new])
    async with Leader(settings) as leader:
        await asyncio.sleep(0.4)
        assert await Reaper(leader.runtime, leader.lease).reap() == 1
    assert await client.handle(run_id).result(timeout=20) == at
    assert (await client.get_run(run_id)).scheduled_at == datetime.fromtimestamp(at / 1000, UTC)


async def test_a_run_no_schedule_made_has_no_scheduled_time(client: Client, worker: Worker) -> None:
    handle = await client.trigger("ticked")
    assert await handle.result(timeout=20) is None
    assert (await handle.get()).scheduled_at is None


async def test_a_long_catch_up_fires_in_rounds(
    settings: Settings, client: Client, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cron, "MAX_TICKS", 4)
    async with Leader(settings) as leader:
        now = await leader.ticker.now_ms()
        start = (now - 5000) // 1000 * 1000
        every = make_record("ticked", None, every=timedelta(seconds=1))
        for key in ("r1", "r2", "r3"):
            await put_due(leader, key, every, start)
        await leader.ticker.tick()
        for key in ("r1", "r2", "r3"):
            times = await each_tick_ran_once(client, settings, key, 1000)
            assert times[0] == start and times[-1] >= now - 1000
