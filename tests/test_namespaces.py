"""Every key and queue carries the namespace; a test leaves nothing behind (item 15).

This module's runs use a Redis database of their own, so that a SCAN of it sees exactly
what conveyor wrote, and RabbitMQ is listed with rabbitmqctl (the broker's own view).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import urllib.parse
from typing import Any

import aio_pika
import msgspec
import pytest

from conveyor import Client, RunFailed, RunNotFound, RunStatus, Settings
from conveyor.broker.delay import LEVELS
from conveyor.broker.topology import Names
from conveyor.shared.redis_client import redis_client
from conveyor.worker import Worker
from tests import tasks
from tests.conftest import cleanup, eventually
from tests.test_bad_input import dead_letters, publish_raw

# Another test of this module, run at the same time elsewhere, writes t<10 hex>: keys.
OTHER_TEST_NAMESPACE = re.compile(r"t[0-9a-f]{10}[:.]")
ISOLATED_DB = 15


@pytest.fixture
def settings(settings: Settings) -> Settings:
    url = urllib.parse.urlsplit(settings.redis_url)
    return msgspec.structs.replace(
        settings, redis_url=urllib.parse.urlunsplit(url._replace(path=f"/{ISOLATED_DB}"))
    )


def _local_broker(settings: Settings) -> bool:
    host = urllib.parse.urlsplit(settings.amqp_url).hostname
    return shutil.which("rabbitmqctl") is not None and host in ("127.0.0.1", "localhost", "::1")


async def _rabbitmqctl(*args: str) -> list[list[str]]:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        *args,
        "-q",
        "--no-table-headers",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return [line.split("\t") for line in out.decode().splitlines() if line.strip()]


async def _broker_view(settings: Settings, bindings: bool = True) -> dict[str, Any]:
    """Queues, exchanges (and bindings) that name the namespace."""
    prefix = f"{settings.namespace}."
    if not _local_broker(settings):
        return await _probe_broker(settings)
    listings = [_rabbitmqctl("list_queues", "name"), _rabbitmqctl("list_exchanges", "name")]
    if bindings:
        listings.append(
            _rabbitmqctl("list_bindings", "source_name", "destination_name", "routing_key")
        )
    queues, exchanges, *wiring = await asyncio.gather(*listings)
    return {
        "queues": {q[0] for q in queues if q[0].startswith(prefix)},
        "exchanges": {e[0] for e in exchanges if e[0].startswith(prefix)},
        "bindings": [b for b in (wiring or [[]])[0] if prefix in b[0] or prefix in b[1]],
    }


async def _probe_broker(settings: Settings) -> dict[str, Any]:
    """Without a local rabbitmqctl: passively declare every name the namespace uses."""
    names = Names(settings.namespace)
    queues = [names.queue(t.queue) for t in tasks.ALL] + [names.dead]
    queues += [names.delay_level(level) for level in range(LEVELS)]
    exchanges = [names.runs, names.delay_deliver, names.dead]
    exchanges += [names.delay_level(level) for level in range(LEVELS)]
    found: dict[str, Any] = {"queues": set(), "exchanges": set(), "bindings": []}
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        for kind, items in (("queues", queues), ("exchanges", exchanges)):
            for name in items:
                channel = await connection.channel()
                try:
                    if kind == "queues":
                        await channel.declare_queue(name, passive=True)
                    else:
                        await channel.declare_exchange(name, passive=True)
                    found[kind].add(name)
                    await channel.close()
                except aio_pika.exceptions.ChannelNotFoundEntity:
                    pass
    return found


async def _redis_keys(settings: Settings) -> list[str]:
    r = redis_client(settings)
    try:
        return [k.decode() async for k in r.scan_iter(count=1000)]
    finally:
        await r.aclose()


async def _exercise(client: Client) -> list[str]:
    """A typical mix: results, steps, retries, failures, idempotency, delay, cancel,
    dead letters. Returns the ids of the runs."""
    handles = [
        await tasks.echo.trigger("a"),
        await tasks.typed_steps.trigger(),  # steps, traces, a retry through the delay ladder
        await tasks.fatal.trigger(),
        await tasks.echo.options(idempotency_key="k1", tags=["t"]).trigger("b"),
        await tasks.echo.options(delay=0.3).trigger("c"),
    ]
    sleeper = await tasks.sleeper.trigger(30)
    await eventually(lambda: _is(sleeper, RunStatus.EXECUTING), timeout=10)
    await sleeper.cancel()
    await publish_raw(client.settings, "echo", [b"not json"])
    for handle in handles:
        try:
            await handle.result(timeout=15)
        except RunFailed as failed:
            assert handle is handles[2] and failed.status == "FAILED", failed
    await eventually(lambda: _is(sleeper, RunStatus.CANCELED), timeout=10)
    await dead_letters(client.settings, 1)
    return [h.id for h in [*handles, sleeper]]


async def _is(handle: Any, status: RunStatus) -> bool:
    return bool(await handle.status() is status)


async def test_everything_carries_the_namespace_and_cleanup_removes_it(settings: Settings) -> None:
    ns = settings.namespace
    try:
        async with Client(settings=settings) as client:
            async with Worker(tasks.ALL, settings=settings, concurrency=10):
                run_ids = await _exercise(client)
                broker = await _broker_view(settings)
            keys = await _redis_keys(settings)
    finally:
        await cleanup(settings)
    after_keys, after_broker = await asyncio.gather(
        _redis_keys(settings), _broker_view(settings, bindings=False)
    )

    traces = {tasks.trace_key(run_id) for run_id in run_ids}
    ours = [
        k
        for k in keys
        if k not in traces and (k.startswith(f"{ns}:") or not OTHER_TEST_NAMESPACE.match(k))
    ]
    assert ours and all(k.startswith(f"{ns}:") for k in ours), ours
    # Run state, steps, the index and idempotency keys all showed up under the namespace.
    assert any(k.startswith(f"{ns}:{{runs:") for k in ours), "the runs index's buckets"
    assert f"{ns}:{{{run_ids[1]}}}:steps" in ours
    assert f"{ns}:idem:echo:k1" in ours
    assert any(k in keys for k in traces), "the test tasks' traces were written"

    assert broker["queues"] >= {f"{ns}.q.echo", f"{ns}.dead", f"{ns}.ladder.0"}
    assert broker["exchanges"] >= {f"{ns}.runs", f"{ns}.delay.deliver", f"{ns}.dead"}
    for source, destination, routing_key in broker["bindings"]:
        # Everything wired to the namespace is the namespace's (or the default exchange).
        assert source == "" or source.startswith(f"{ns}."), (source, destination)
        assert destination.startswith(f"{ns}."), (source, destination, routing_key)

    assert [k for k in after_keys if k.startswith(f"{ns}:") or k in traces] == []
    assert after_broker == {"queues": set(), "exchanges": set(), "bindings": []}


async def test_namespaces_do_not_see_each_other(settings: Settings) -> None:
    other = msgspec.structs.replace(settings, namespace=f"{settings.namespace}x")
    try:
        async with (
            Client(settings=settings) as mine,
            Client(settings=other) as theirs,
            Worker([tasks.echo], settings=other, concurrency=2),
        ):
            handle = await mine.trigger("echo", {"value": "mine"})
            await asyncio.sleep(0.3)  # a worker of the other namespace must not take it
            assert await handle.status() is RunStatus.QUEUED
            with pytest.raises(RunNotFound):
                await theirs.get_run(handle.id)
            assert (await theirs.list_runs()).runs == []
            async with Worker([tasks.echo], settings=settings, concurrency=2):
                assert await handle.result(timeout=10) == "mine"
    finally:
        await cleanup(settings)
        await cleanup(other)
