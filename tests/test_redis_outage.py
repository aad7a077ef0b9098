"""Redis or RabbitMQ unavailable under a worker process (issue 7 item 1).

An outage is not a bad message: the worker holds what it has, takes nothing new, backs
off, and carries on when the service answers. No delivery is burnt on it, so no run is
dead-lettered for it, and the worker idles meanwhile instead of spinning. The Redis here
is the test's own, with an AOF written on every command, killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from conveyor import Client, RunHandle, Settings
from conveyor.broker.topology import Names
from conveyor.shared.keys import Keys
from tests import tasks
from tests.conftest import Services, WorkerProcess, cleanup, eventually
from tests.faults import DELIVERIES, delivery_counts, queue_counts, wait_for_consumers
from tests.servers import OwnRedis, Proxy

pytestmark = pytest.mark.timeout(300)

RUNS = 1000
OUTAGE_S = 20.0


async def _statuses(url: str, namespace: str, handles: list[RunHandle[Any]]) -> list[list[Any]]:
    """status, attempt and crashes of each run, read in one pipeline."""
    keys = Keys(namespace)
    r = aioredis.Redis.from_url(url)
    try:
        async with r.pipeline(transaction=False) as pipe:
            for h in handles:
                pipe.hmget(keys.run(h.id), ["status", "attempt", "crashes"])
            return list(await pipe.execute())
    finally:
        await r.aclose()


async def _completed(url: str, namespace: str, handles: list[RunHandle[Any]]) -> int:
    rows = await _statuses(url, namespace, handles)
    return sum(1 for status, _, _ in rows if status == b"COMPLETED")


async def test_redis_killed_for_20s_under_a_backlog_loses_nothing_and_burns_no_delivery(
    tmp_path: Path, services: Services, namespace: str
) -> None:
    server = OwnRedis(data_dir=tmp_path)
    server.start()
    settings = Settings(
        amqp_url=services.amqp_url,
        redis_url=server.url,
        namespace=namespace,
        lease_ttl=2.0,
        shutdown_grace=5.0,
    )
    deliveries = tmp_path / "deliveries.log"
    worker: WorkerProcess | None = None
    try:
        async with Client(settings=settings):
            handles = await tasks.nap.batch_trigger([{"seconds": 0.02}] * RUNS)
        worker = WorkerProcess(
            settings,
            "tests.faults",
            "--concurrency",
            "10",
            env={DELIVERIES: str(deliveries)},
            log=tmp_path / "worker.log",
        )
        await eventually(
            lambda: _at_least(server.url, namespace, handles, 100), timeout=30, interval=0.02
        )
        done_before = await _completed(server.url, namespace, handles)
        server.kill()
        assert done_before < RUNS - 100, "the backlog was drained before the outage"
        cpu_before = worker.cpu_seconds()
        await asyncio.sleep(OUTAGE_S)
        cpu_during = worker.cpu_seconds() - cpu_before
        assert worker.proc.poll() is None, worker.output()
        server.start()

        await eventually(
            lambda: _at_least(server.url, namespace, handles, RUNS), timeout=90, interval=0.2
        )
        rows = await _statuses(server.url, namespace, handles)
        # Runs caught mid-claim or mid-finish were neither charged a crash nor run twice.
        assert {(a, c) for _, a, c in rows} == {(b"1", b"0")}
        names = Names(namespace)
        assert (await queue_counts(settings, [names.dead]))[names.dead][0] == 0
        counts = delivery_counts(str(deliveries))
        assert len(counts) >= RUNS
        assert max(counts) <= 2, f"deliveries burnt: {sorted(counts)[-10:]}"
        # Waiting, not spinning: a fraction of one core over the outage.
        assert cpu_during / OUTAGE_S < 0.1, f"{cpu_during:.2f}s of CPU in {OUTAGE_S}s"
        assert "Redis is unavailable" in worker.output()
        assert "Redis answers again" in worker.output()
    finally:
        if worker is not None:
            worker.kill()
            worker.wait()
        if server.proc is None:
            server.start()
        await cleanup(settings)
        server.kill()


async def _at_least(url: str, namespace: str, handles: list[RunHandle[Any]], n: int) -> bool:
    return await _completed(url, namespace, handles) >= n


async def test_worker_started_while_redis_and_rabbitmq_are_down_waits_for_both(
    tmp_path: Path, services: Services, namespace: str
) -> None:
    server = OwnRedis()  # not started yet
    broker = Proxy(urlsplit(services.amqp_url).port or 5672)  # its port refuses until started
    amqp = services.amqp_url.replace(f":{urlsplit(services.amqp_url).port}/", f":{broker.port}/")
    settings = Settings(amqp_url=amqp, redis_url=server.url, namespace=namespace, lease_ttl=2.0)
    worker = WorkerProcess(settings, log=tmp_path / "worker.log")
    direct = Settings(amqp_url=services.amqp_url, redis_url=server.url, namespace=namespace)
    try:
        await eventually(
            lambda: _logged(worker, "waiting for Redis at redis://127.0.0.1"), timeout=15
        )
        await asyncio.sleep(5)
        assert worker.proc.poll() is None, worker.output()
        server.start()
        await eventually(
            lambda: _logged(worker, f"waiting for RabbitMQ at amqp://127.0.0.1:{broker.port}"),
            timeout=15,
        )
        await asyncio.sleep(3)
        assert worker.proc.poll() is None, worker.output()
        await broker.start()
        await wait_for_consumers(direct, tasks.echo.queue, 1, timeout=30)
        async with Client(settings=direct) as client:
            handle = await client.trigger("echo", {"value": "up"})
            assert await handle.result(timeout=30) == "up"
    finally:
        worker.kill()
        worker.wait()
        await broker.close()
        if server.proc is not None:
            await cleanup(direct)
            server.kill()


async def _logged(worker: WorkerProcess, text: str) -> bool:
    return text in worker.output()
