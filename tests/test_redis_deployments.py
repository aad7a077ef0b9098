"""conveyor on Redis as teams deploy it: TLS with a private CA and client certificates,
and a primary with a replica behind three sentinels, each started by the test from
redis-server, with real worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
import redis

from conveyor import Client, RunStatus, Settings
from conveyor.shared.errors import ConfigurationError
from conveyor.shared.redis_client import redis_client
from tests import tasks
from tests.conftest import WorkerProcess, cleanup
from tests.servers import Certificates, SentinelGroup, TlsRedis


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    server = TlsRedis(Certificates(tmp_path))
    yield server
    server.close()


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path)
    yield group
    group.close()


@contextlib.asynccontextmanager
async def _running(settings: Settings) -> AsyncIterator[tuple[Client, WorkerProcess]]:
    """A client and a real worker process on `settings`."""
    async with Client(settings=settings) as client:
        worker = WorkerProcess(settings)
        try:
            yield client, worker
        finally:
            worker.kill()
            worker.wait()
    await cleanup(settings)


def _settings(settings: Settings, redis_url: str) -> Settings:
    return msgspec.structs.replace(settings, redis_url=redis_url)


async def test_tls_with_a_private_ca_and_client_certificates(
    settings: Settings, tls_redis: TlsRedis
) -> None:
    tls = _settings(settings, tls_redis.url())
    async with _running(tls) as (client, _worker):
        assert await (await tasks.echo.trigger("tls", times=2)).result(timeout=30) == "tlstls"
        handle = await tasks.three_steps.trigger(0.05)
        assert await handle.result(timeout=30) == ["s1", "s2", "s3"]
        run = await client.get_run(handle.id)
        assert run.steps and len(run.steps) == 3  # checkpoints written over TLS
        sleeping = await tasks.sleeper.trigger(30)
        await _until_status(client, sleeping.id, RunStatus.EXECUTING)
        assert await sleeping.cancel() is RunStatus.EXECUTING  # the status it had
        await _until_status(client, sleeping.id, RunStatus.CANCELED)


async def test_tls_options_of_the_url_are_honoured(tls_redis: TlsRedis) -> None:
    # Without the private CA the server's certificate is refused; without a client
    # certificate the server refuses the client: the URL's options reach the connection.
    for url in (tls_redis.url(ca=False), tls_redis.url(client_cert=False)):
        r = redis_client(Settings(redis_url=url, connect_timeout=3.0))
        with pytest.raises(redis.exceptions.ConnectionError):
            await r.ping()
        await r.aclose()
    r = redis_client(Settings(redis_url=tls_redis.url()))
    assert await r.ping()
    await r.aclose()


async def test_sentinel_runs_and_survives_a_failover(
    settings: Settings, sentinel_group: SentinelGroup
) -> None:
    behind_sentinels = _settings(settings, sentinel_group.url)
    async with _running(behind_sentinels) as (client, _worker):
        assert await (await tasks.echo.trigger("s", times=3)).result(timeout=30) == "sss"
        first = sentinel_group.primary_port()
        assert first == sentinel_group.primary.port
        # A run in flight, mid-step, when the primary dies.
        handle = await tasks.three_steps.trigger(4.0)
        await _until_status(client, handle.id, RunStatus.EXECUTING)
        await asyncio.sleep(1.0)
        sentinel_group.primary.kill()
        deadline = time.monotonic() + 60
        while sentinel_group.primary_port() == first:
            assert time.monotonic() < deadline, "the sentinels did not fail over"
            await asyncio.sleep(0.2)
        assert await handle.result(timeout=90) == ["s1", "s2", "s3"]
        # New runs go to the new primary.
        assert await (await tasks.echo.trigger("after", times=1)).result(timeout=30) == "after"


def test_bad_redis_urls_are_refused_with_the_reason() -> None:
    cases = {
        "http://127.0.0.1:6379/0": "scheme",
        "redis+sentinel:///svc/0": "sentinel",
        "redis+sentinel://127.0.0.1:26379/": "service",
        "redis+sentinel://127.0.0.1:x/svc": "port",
        "redis+sentinel://127.0.0.1:26379/svc/zero": "db",
        "redis+sentinel://127.0.0.1:26379/svc/0?colour=blue": "colour",
    }
    for url, reason in cases.items():
        with pytest.raises(ConfigurationError, match=reason):
            redis_client(Settings(redis_url=url))


async def _until_status(client: Client, run_id: str, status: RunStatus) -> None:
    deadline = time.monotonic() + 30
    while (await client.get_run(run_id)).status is not status:
        assert time.monotonic() < deadline, f"run {run_id} never became {status.value}"
        await asyncio.sleep(0.05)
