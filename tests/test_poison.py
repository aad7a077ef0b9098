"""Poison messages (issue item 7): a run that kills every worker that takes it ends CRASHED
after settings.max_crashes attempts, its message is dead-lettered with the reason, and the
runs fetched together with it complete."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aio_pika
import msgspec
import pytest

from conveyor import Client, RunFailed, RunHandle, RunStatus, Settings
from conveyor.broker.publisher import QUEUE_HEADER, REASON_HEADER
from conveyor.broker.topology import Names
from tests import tasks
from tests.faults import drop_traces, trace


class WorkerPool:
    """Keeps `size` worker processes alive, replacing each one that dies."""

    def __init__(self, spawn: Any, size: int) -> None:
        self.spawn = spawn
        self.workers = [spawn() for _ in range(size)]
        self.deaths: list[int] = []
        self._task = asyncio.create_task(self._respawn())

    async def _respawn(self) -> None:
        while True:
            for i, w in enumerate(self.workers):
                code = w.proc.poll()
                if code is not None:
                    self.deaths.append(code)
                    self.workers[i] = self.spawn()
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _dead_letters(settings: Settings) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(Names(settings.namespace).dead, passive=True)
        found = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            found.append(message)
        return found


async def test_poison_run_crashes_and_is_dead_lettered_others_complete(
    client: Client, settings: Settings, spawn_worker: Any
) -> None:
    run_ids: list[str] = []
    pool: WorkerPool | None = None
    try:
        poison = await client.trigger("poison")
        run_ids.append(poison.id)
        # Runs fetched together with the poison: on its own queue and on other queues,
        # including sleepers that are still executing when the poison kills their worker.
        echoes: dict[str, RunHandle[Any]] = {}
        for i in range(4):
            echoes[f"q{i}"] = await client.trigger("echo", {"value": f"q{i}"}, queue="poison")
        handles = await tasks.echo.batch_trigger([{"value": f"o{i}"} for i in range(4)])
        echoes.update({f"o{i}": h for i, h in enumerate(handles)})
        sleepers = [
            await client.trigger("sleeper", {"seconds": 0.3}, queue="poison") for _ in range(3)
        ]
        sleepers += await tasks.sleeper.batch_trigger([{"seconds": 0.3} for _ in range(3)])
        run_ids += [h.id for h in [*echoes.values(), *sleepers]]
        # Workers start only now, so the first one fetches the poison together with
        # everything queued behind it (prefetch = concurrency = 100).
        pool = WorkerPool(spawn_worker, 2)

        with pytest.raises(RunFailed):
            await poison.result(timeout=40)
        run = await client.get_run(poison.id)
        assert run.status is RunStatus.CRASHED
        assert run.error and f"died {settings.max_crashes} times" in run.error
        assert [a.status for a in run.attempts] == ["CRASHED"] * settings.max_crashes
        assert await trace(settings, poison.id) == [
            f"poison@{n}" for n in range(1, settings.max_crashes + 1)
        ]
        # One worker death per attempt: the deliveries that ran it are bounded by max_crashes.
        assert pool.deaths == [-9] * settings.max_crashes

        for value, handle in echoes.items():
            assert await handle.result(timeout=20) == value
        for handle in sleepers:
            assert await handle.result(timeout=20) == "slept"

        dead = await _dead_letters(settings)
        assert len(dead) == 1, [m.headers for m in dead]
        headers = dead[0].headers or {}
        assert f"died {settings.max_crashes} times" in str(headers[REASON_HEADER])
        assert headers[QUEUE_HEADER] == "poison"
        assert headers["x-conveyor-run-id"] == poison.id
        assert msgspec.json.decode(dead[0].body)["id"] == poison.id
    finally:
        if pool is not None:
            await pool.close()
        if run_ids:
            await drop_traces(settings, *run_ids)


async def test_last_chance_runs_alone_so_a_neighbour_is_never_charged(
    client: Client, settings: Settings, spawn_worker: Any
) -> None:
    """Both runs have crashed max_crashes - 1 times (as after two co-located deaths): the
    poison's last attempt must not take the innocent run down with it."""
    victim = await client.trigger("sleeper", {"seconds": 1.0}, queue="poison")
    poison = await client.trigger("poison")
    run_ids = [poison.id, victim.id]
    for run_id in run_ids:
        await client.redis.hset(client.store.keys.run(run_id), "crashes", settings.max_crashes - 1)
    pool = WorkerPool(spawn_worker, 1)  # it fetches both messages together
    try:
        with pytest.raises(RunFailed):
            await poison.result(timeout=30)
        assert await victim.result(timeout=20) == "slept"
        assert [a.status for a in (await client.get_run(poison.id)).attempts] == ["CRASHED"]
        assert [a.status for a in (await client.get_run(victim.id)).attempts] == ["COMPLETED"]
        assert pool.deaths == [-9]
    finally:
        await pool.close()
        await drop_traces(settings, *run_ids)
