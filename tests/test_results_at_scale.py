"""result() at scale (issue 8, "Reading runs at scale"): many waits share one subscription
to the runs' end notices and batched reads, a lost notice only delays a wait until the
next re-read, and Redis being down ends a wait at its timeout with the reason.

The module's client re-reads waited runs only every 600 s: a wait that ends sooner here
was woken by a notice (or by the first read of a run that had ended already).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from conveyor import Client, ResultTimeout, RunFailed, RunStatus, Settings
from conveyor.shared.keys import Keys
from conveyor.shared.redis_client import redis_client
from tests import tasks
from tests.conftest import Services, cleanup, eventually
from tests.servers import OwnRedis

pytestmark = pytest.mark.timeout(300)

RUNS = 10_000
TERMINAL = "|".join(s.value for s in RunStatus if s.is_terminal)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, result_recheck=600.0)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    r = redis_client(settings)
    yield r
    await r.aclose()


async def _connections(r: aioredis.Redis, namespace: str) -> list[dict[str, Any]]:
    """The Redis connections of the namespace's Client (it names them)."""
    clients: list[dict[str, Any]] = await r.client_list()
    return [c for c in clients if c["name"] == f"conveyor-client:{namespace}"]


async def _complete_silently(r: aioredis.Redis, namespace: str, run_id: str, output: str) -> None:
    """End a run COMPLETED the way finish.lua does, but without its notice: as if the
    notice were lost."""
    await r.hset(
        Keys(namespace).run(run_id), mapping={"status": "COMPLETED", "output": f'"{output}"'}
    )


def test_every_script_that_ends_a_run_publishes_its_end() -> None:
    """Each write of a terminal status to a run (the token scripts write tokens) comes
    with a notice on the ended channel."""
    lua = resources.files("conveyor.shared").joinpath("lua")
    ending = re.compile(rf"'status', (?:'(?:{TERMINAL})'|run_status)")
    writers = []
    for path in lua.iterdir():
        if not path.name.endswith(".lua") or path.name.startswith("token_"):
            continue
        text = path.read_text()
        ends = len(ending.findall(text))
        if ends:
            writers.append(path.name)
        assert text.count("redis.call('PUBLISH', ns .. ':ended', id)") == ends, path.name
    assert sorted(writers) == [
        "abandon.lua",
        "cancel.lua",
        "claim.lua",
        "dead_run.lua",
        "expire.lua",
        "finish.lua",
    ]


async def test_ten_thousand_results_awaited_at_once(
    client: Client, spawn_worker: Any, redis: aioredis.Redis, namespace: str
) -> None:
    handles = []
    for start in range(0, RUNS, 1000):
        handles += await tasks.echo.batch_trigger(
            [{"value": str(i)} for i in range(start, start + 1000)]
        )
    # Every wait is registered before a worker takes the first run.
    waiting = asyncio.ensure_future(asyncio.gather(*(h.result(timeout=240) for h in handles)))
    most = 0
    for _ in range(10):
        await asyncio.sleep(0.05)
        most = max(most, len(await _connections(redis, namespace)))
    spawn_worker("--concurrency", "200")
    while not waiting.done():
        await asyncio.wait([waiting], timeout=0.2)
        most = max(most, len(await _connections(redis, namespace)))
    assert waiting.result() == [str(i) for i in range(RUNS)]
    # One subscription and one connection reading (plus one for the triggers' own reads).
    assert 1 <= most <= 4, most


async def test_a_run_ended_before_the_call_returns_at_once(
    client: Client, worker: Any, settings: Settings
) -> None:
    handle = await tasks.echo.trigger("done")
    assert await handle.result(timeout=30) == "done"
    # A client that has not subscribed yet: the first read finds the end.
    async with Client(settings=settings) as fresh:
        started = time.monotonic()
        again = fresh.handle(handle.id)
        assert await asyncio.gather(again.result(timeout=30), again.result(timeout=30)) == [
            "done",
            "done",
        ]
        assert time.monotonic() - started < 10


async def test_a_cancel_wakes_the_wait(client: Client) -> None:
    handle = await tasks.echo.options(delay=3600).trigger("never run")
    waiting = asyncio.ensure_future(handle.result(timeout=60))
    await asyncio.sleep(0.2)
    await handle.cancel()
    with pytest.raises(RunFailed) as info:
        await waiting
    assert info.value.status == "CANCELED"


async def test_a_lost_notice_ends_the_wait_at_the_next_re_read(
    client: Client, settings: Settings, redis: aioredis.Redis, namespace: str
) -> None:
    handle = await tasks.echo.options(delay=3600).trigger("queued")
    rechecking = msgspec.structs.replace(settings, result_recheck=0.5)
    async with Client(settings=rechecking) as waiter:
        waiting = asyncio.ensure_future(waiter.handle(handle.id).result(timeout=60))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await _complete_silently(redis, namespace, handle.id, "by hand")
        assert await waiting == "by hand"


async def test_a_lost_subscription_re_reads_every_waited_run(
    client: Client, redis: aioredis.Redis, namespace: str
) -> None:
    """No re-read for 600 s: only subscribing again (and reading every waited run then)
    can end this wait, whose notice was never sent."""
    handle = await tasks.echo.options(delay=3600).trigger("queued")
    waiting = asyncio.ensure_future(handle.result(timeout=60))

    async def subscriber() -> list[dict[str, Any]]:
        return [c for c in await _connections(redis, namespace) if c["sub"] == "1"]

    [subscription] = await eventually(subscriber)
    await _complete_silently(redis, namespace, handle.id, "after a reconnect")
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await redis.client_kill_filter(_id=subscription["id"])
    assert await waiting == "after a reconnect"


async def test_the_subscription_ends_soon_after_the_last_wait(
    client: Client, redis: aioredis.Redis, namespace: str
) -> None:
    """A client that waits for nothing does not keep receiving the namespace's ends."""
    handle = await tasks.echo.options(delay=3600).trigger("later")
    with pytest.raises(ResultTimeout):
        await handle.result(timeout=0.5)

    async def unsubscribed() -> bool:
        return not [c for c in await _connections(redis, namespace) if c["sub"] == "1"]

    await eventually(unsubscribed, timeout=60)


async def test_a_timeout_raises_result_timeout_with_the_status(client: Client) -> None:
    handle = await tasks.echo.options(delay=3600).trigger("later")
    with pytest.raises(ResultTimeout) as info:
        await handle.result(timeout=0.5)
    assert info.value.status == "DELAYED"
    assert info.value.unavailable is None


async def test_redis_down_during_result_backs_off_and_ends_clearly(
    services: Services, namespace: str, tmp_path: Path
) -> None:
    server = OwnRedis(data_dir=tmp_path)
    server.start()
    settings = Settings(
        amqp_url=services.amqp_url,
        redis_url=server.url,
        namespace=namespace,
        result_recheck=600.0,
    )
    try:
        async with Client(settings=settings) as client:
            handle = await tasks.echo.options(delay=3600).trigger("queued")
            waiting = asyncio.ensure_future(handle.result(timeout=120))
            await asyncio.sleep(0.3)
            server.kill()
            # Down all through its wait: a timeout that says why.
            with pytest.raises(ResultTimeout) as info:
                await client.handle(handle.id).result(timeout=2)
            assert info.value.unavailable is not None
            assert "Redis did not answer" in str(info.value)
            # Back (its AOF loaded): the wait that was under way subscribes again and
            # wakes on the cancel's notice.
            server.start()
            assert not waiting.done()
            await client.cancel(handle.id)
            with pytest.raises(RunFailed) as failed:
                await waiting
            assert failed.value.status == "CANCELED"
            await cleanup(settings)
    finally:
        server.stop()
