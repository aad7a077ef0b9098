"""A reply lost after Redis applied the write is not a crash (issue 7 item 4).

A TCP proxy between the worker and Redis lets a claim, a checkpoint or a finish reach
Redis and throws its reply away, closing the connection, as a network that fails at that
moment would. The worker sends the same call again once Redis answers: the claim token
makes a repeated claim return the same attempt, a checkpoint already saved is kept, and a
finish already written answers as the first time. So no crash is counted, no step runs
twice and no outcome is lost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from conveyor import Client, RunStatus, Settings
from conveyor.shared.scripts import source
from conveyor.worker import Worker
from tests import tasks
from tests.conftest import Services, cleanup
from tests.faults import announced_token, trace
from tests.servers import Proxy

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def proxy(services: Services) -> AsyncIterator[Proxy]:
    p = Proxy(urlsplit(services.redis_url).port or 6379)
    await p.start()
    yield p
    await p.close()


@pytest.fixture
async def through_proxy(
    services: Services, namespace: str, proxy: Proxy
) -> AsyncIterator[tuple[Client, Worker]]:
    """A client on the real Redis, and a worker whose Redis traffic crosses the proxy."""
    direct = Settings(
        amqp_url=services.amqp_url, redis_url=services.redis_url, namespace=namespace, lease_ttl=2.0
    )
    cut = Settings(
        amqp_url=services.amqp_url,
        redis_url=services.redis_url.replace(
            f":{urlsplit(services.redis_url).port}/", f":{proxy.port}/"
        ),
        namespace=namespace,
        lease_ttl=2.0,
    )
    async with Client(settings=direct) as client:
        # Loaded beforehand: else the reply thrown away could be a NOSCRIPT, not an answer.
        for name in client.store.scripts.sha:
            await client.redis.script_load(source(name))
        worker = Worker(tasks.ALL, settings=cut, concurrency=5)
        await worker.start()
        try:
            yield client, worker
        finally:
            await worker.shutdown()
    await cleanup(direct)


@pytest.mark.parametrize("script", ["claim", "checkpoint"])
async def test_lost_reply_to_a_claim_or_checkpoint_is_sent_again_not_charged(
    through_proxy: tuple[Client, Worker], proxy: Proxy, settings: Settings, script: str
) -> None:
    client, worker = through_proxy
    proxy.cut_reply_after(worker.store.scripts.sha[script].encode())
    handle = await tasks.typed_steps.trigger(fail_first=False)
    output = await handle.result(timeout=30)
    assert output["box"] == "b"
    assert proxy.cuts == 1
    run = await client.get_run(handle.id)
    assert [a.status for a in run.attempts] == ["COMPLETED"]
    # Each step ran once: the checkpoint whose reply was lost had been saved.
    events = await trace(settings, handle.id)
    assert events == ["make_point@1", "make_box@1", "make_bytes@1"]
    raw = await client.redis.hget(client.store.keys.run(handle.id), "crashes")
    assert raw == b"0"


async def test_lost_reply_to_a_retrying_finish_still_schedules_the_retry(
    through_proxy: tuple[Client, Worker], proxy: Proxy, settings: Settings
) -> None:
    client, worker = through_proxy
    proxy.cut_reply_after(worker.store.scripts.sha["finish"].encode())
    handle = await tasks.flaky.trigger(succeed_on=2)
    # Without an idempotent finish the repeated call would find the run RETRYING, answer
    # "stale", and nothing would publish the retry: the run would wait for ever.
    assert await handle.result(timeout=30) == 2
    assert proxy.cuts == 1
    run = await client.get_run(handle.id)
    assert run.status is RunStatus.COMPLETED
    assert [a.status for a in run.attempts] == ["FAILED", "COMPLETED"]


async def test_lost_reply_to_a_completing_finish_keeps_the_output(
    through_proxy: tuple[Client, Worker], proxy: Proxy
) -> None:
    client, worker = through_proxy
    proxy.cut_reply_after(worker.store.scripts.sha["finish"].encode())
    handle = await tasks.echo.trigger("kept", times=2)
    assert await handle.result(timeout=30) == "keptkept"
    assert proxy.cuts == 1
    run = await client.get_run(handle.id)
    assert [a.status for a in run.attempts] == ["COMPLETED"]


@pytest.mark.parametrize("script", ["wait", "suspend", "resolve"])
async def test_lost_reply_to_a_wait_is_sent_again(
    through_proxy: tuple[Client, Worker], proxy: Proxy, settings: Settings, script: str
) -> None:
    """Recording waits, suspending, and a child's end reaching its parent: each answers
    a repeated call as the first, so the parent completes with no crash and each child
    runs once."""
    client, worker = through_proxy
    proxy.cut_reply_after(worker.store.scripts.sha[script].encode())
    handle = await tasks.gather_doubles.trigger()
    assert await handle.result(timeout=30) == [2, 4, 6]
    assert proxy.cuts == 1
    run = await client.get_run(handle.id)
    assert "CRASHED" not in [a.status for a in run.attempts]
    assert run.attempts[-1].status == "COMPLETED"
    for child in run.children:
        assert [a.status for a in (await client.get_run(child)).attempts] == ["COMPLETED"]


@pytest.mark.parametrize("script", ["token_create", "token_wait"])
async def test_lost_reply_to_a_token_call_is_sent_again(
    through_proxy: tuple[Client, Worker], proxy: Proxy, settings: Settings, script: str
) -> None:
    client, worker = through_proxy
    proxy.cut_reply_after(worker.store.scripts.sha[script].encode())
    handle = await tasks.approval.trigger(timeout=60)
    token_id = await announced_token(settings, handle.id)
    await client.complete_token(token_id, {"ok": True})
    assert await handle.result(timeout=30) == {"data": {"ok": True}}
    assert proxy.cuts == 1
    run = await client.get_run(handle.id)
    assert "CRASHED" not in [a.status for a in run.attempts]
