"""Run TTL (issue 10): `ttl=` on a task or a trigger; a run that no worker started by
then (its delay included) ends EXPIRED without running, and one that started never does.
Real services; the reaper's part with a real `conveyor scheduler` process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest

from conveyor import (
    Client,
    InvalidOption,
    Retry,
    RunFailed,
    RunStatus,
    Settings,
    TaskDefinitionError,
    current_run,
    task,
)
from conveyor.broker.publisher import Outgoing
from conveyor.shared.ids import new_run_id
from conveyor.shared.models import RunMessage
from conveyor.shared.scripts import source
from conveyor.shared.store import NewRun
from conveyor.worker import Worker
from conveyor.worker.validation import Invalid, Valid, validate
from tests.conftest import Services, cleanup, eventually
from tests.faults import trace
from tests.servers import Proxy
from tests.tasks import record
from tests.test_bad_input import publish_raw

pytestmark = pytest.mark.timeout(90)


@task(id="ttl-hold", retry=Retry(max_attempts=1))
async def hold(seconds: float) -> None:
    await asyncio.sleep(seconds)


@task(id="ttl-body", retry=Retry(max_attempts=1))
async def body() -> str:
    await record("body")
    return "ran"


@task(id="ttl-default", retry=Retry(max_attempts=1), ttl=0.5)
async def with_default() -> str:
    await record("default")
    return "ran"


@task(id="ttl-retried", retry=Retry(max_attempts=2, min_delay=2.5, jitter=False), ttl=2.0)
async def retried() -> int:
    await record("retried")
    if current_run().attempt == 1:
        raise RuntimeError("the first attempt fails")
    return current_run().attempt


@task(id="ttl-parent", retry=Retry(max_attempts=1))
async def parent() -> str:
    try:
        await body.options(ttl=0.3).trigger_and_wait()
    except RunFailed as exc:
        return f"{exc.status}: {exc.error}"
    return "the child ran"


@task(id="ttl-batch-parent", retry=Retry(max_attempts=1))
async def batch_parent(n: int) -> list[str | None]:
    results = await body.options(ttl=timedelta(milliseconds=300)).batch_trigger_and_wait([{}] * n)
    return [None if r.ok else r.status for r in results]


def _ms(moment: Any) -> int:
    return round(moment.timestamp() * 1000)


async def _expired(client: Client, run_id: str) -> None:
    """The run ended EXPIRED as a never-started run does, and its body never ran."""
    run = await client.get_run(run_id)
    assert run.status is RunStatus.EXPIRED
    assert run.attempts == [] and run.started_at is None
    assert run.finished_at is not None and run.expires_at is not None
    assert run.finished_at >= run.expires_at
    assert run.error is not None and "not started within its ttl of" in run.error
    assert await trace(client.settings, run_id) == []
    # Kept for CONVEYOR_RUN_TTL like every ended run, then gone.
    assert 0 < await client.redis.ttl(client.store.keys.run(run_id)) <= client.settings.run_ttl


async def test_a_run_queued_behind_a_busy_worker_past_its_ttl_expires_unrun(
    client: Client, settings: Settings
) -> None:
    async with Worker([hold, body], settings=settings, concurrency=1):
        busy = await hold.trigger(1.5)
        await eventually(lambda: _status_is(client, busy.id, RunStatus.EXECUTING))
        late = await body.options(ttl=0.5).trigger()
        with pytest.raises(RunFailed) as failed:
            await late.result(timeout=30)
        assert failed.value.status == "EXPIRED"
        assert (
            failed.value.error == "not started within its ttl of 0.5s (no worker took it in time)"
        )
        await busy.result(timeout=30)
    await _expired(client, late.id)


async def test_a_run_that_started_in_time_retries_past_its_ttl(
    client: Client, settings: Settings
) -> None:
    # ttl 2 s, the retry 2.5 s after the first attempt: the retry starts past the deadline.
    async with Worker([retried], settings=settings):
        handle = await retried.trigger()
        assert await handle.result(timeout=30) == 2
    run = await client.get_run(handle.id)
    assert [a.status for a in run.attempts] == ["FAILED", "COMPLETED"]
    assert run.expires_at is not None and run.attempts[1].started_at > run.expires_at
    assert await trace(settings, handle.id) == ["retried@1", "retried@2"]


async def test_the_task_default_and_a_triggers_override(client: Client, settings: Settings) -> None:
    # No worker until after the default's 0.5 s.
    default = await with_default.trigger()
    kept = await with_default.options(ttl=None, tags=["t"]).trigger()
    longer = await with_default.options(ttl=30).trigger()
    by_id = await client.trigger("ttl-default", ttl=timedelta(seconds=0.5))
    plain = await client.trigger("ttl-default")  # by id: the task's default is not known
    await asyncio.sleep(1.0)
    async with Worker([with_default], settings=settings):
        assert await longer.result(timeout=30) == "ran"
        assert await plain.result(timeout=30) == "ran"
        for h in (default, kept, by_id):
            with pytest.raises(RunFailed, match="EXPIRED"):
                await h.result(timeout=30)
    for h, ttl_ms in [(default, 500), (kept, 500), (longer, 30_000), (by_id, 500)]:
        run = await client.get_run(h.id)
        assert run.expires_at is not None
        assert _ms(run.expires_at) - _ms(run.created_at) == ttl_ms
    assert (await client.get_run(plain.id)).expires_at is None
    for h in (default, kept, by_id):
        await _expired(client, h.id)


async def test_a_delayed_runs_ttl_counts_from_the_end_of_its_delay(
    client: Client, settings: Settings
) -> None:
    # Counted from the trigger, 1.5 s would be over before the 2 s delay is.
    async with Worker([body], settings=settings):
        handle = await body.options(delay=2.0, ttl=1.5).trigger()
        run = await client.get_run(handle.id)
        assert run.status is RunStatus.DELAYED
        assert run.expires_at is not None
        assert _ms(run.expires_at) - _ms(run.created_at) == 3500
        assert await handle.result(timeout=30) == "ran"


async def test_an_expired_child_fails_the_parents_wait(client: Client, settings: Settings) -> None:
    # The parent's worker does not run the child's task: the child waits past its ttl
    # until a worker for it starts, whose claim ends it EXPIRED and tells the parent.
    async with Worker([parent], settings=settings):
        handle = await parent.trigger()
        await eventually(lambda: _status_is(client, handle.id, RunStatus.WAITING))
        await asyncio.sleep(0.6)
        async with Worker([body], settings=settings):
            result = await handle.result(timeout=30)
    assert result == "EXPIRED: not started within its ttl of 0.3s (no worker took it in time)"
    [child] = (await client.get_run(handle.id)).children
    await _expired(client, child)


async def test_the_reaper_expires_children_no_worker_takes_and_tells_the_parent(
    client: Client, settings: Settings, spawn_scheduler: Any
) -> None:
    # No worker ever runs `ttl-body`: only the reaper can end the children.
    spawn_scheduler()
    async with Worker([batch_parent], settings=settings):
        handle = await batch_parent.trigger(n=3)
        assert await handle.result(timeout=40) == ["EXPIRED"] * 3
    children = (await client.get_run(handle.id)).children
    assert len(children) == 3
    for child in children:
        await _expired(client, child)


async def test_the_reaper_expires_a_run_whose_message_was_lost(
    client: Client, settings: Settings, spawn_scheduler: Any
) -> None:
    # Created as a client killed before its publish leaves it: no message anywhere.
    lost = NewRun(new_run_id(), "ttl-body", "ttl-body", b"{}", [], None, 0, ttl_ms=300)
    [created] = await client.store.create([lost])
    assert created.created
    async with Worker([body], settings=settings):
        spawn_scheduler()
        await eventually(lambda: _status_is(client, lost.run_id, RunStatus.EXPIRED), timeout=30)
        # Expired rather than republished: nothing reaches the worker to run it.
        await asyncio.sleep(1.0)
    await _expired(client, lost.run_id)


async def test_bad_ttls_are_refused_with_the_reason(client: Client) -> None:
    async def fn() -> None:
        pass

    for bad, why in [
        (0, "must be more than 0"),
        (-1.5, "got -1.5"),
        (float("nan"), "got nan"),
        (timedelta(0), "got datetime.timedelta(0)"),
        (400 * 86_400, "at most 31622400 seconds"),
        ("30", "must be seconds (a number) or a timedelta, got '30'"),
        (True, "got True"),
    ]:
        with pytest.raises(TaskDefinitionError, match="'ttl-bad': ttl ") as defined:
            task(id="ttl-bad", ttl=bad)(fn)  # type: ignore[arg-type]
        assert why in str(defined.value)
        with pytest.raises(InvalidOption) as option:
            body.options(ttl=bad)  # type: ignore[arg-type]
        assert option.value.field == "ttl" and why in option.value.detail
        with pytest.raises(InvalidOption) as by_id:
            await client.trigger("ttl-body", ttl=bad)  # type: ignore[arg-type]
        assert by_id.value.field == "ttl" and why in by_id.value.detail
    now = int(time.time() * 1000)
    for wire, why in [
        (0, "ttl 0 must be 1 to"),
        (-5, "ttl -5 must be 1 to"),
        (1.5, "Expected `int | null`, got `float` - at `$.ttl`"),
    ]:
        raw = msgspec.json.encode({"task": "ttl-body", "id": "r1", "ttl": wire})
        checked = validate(raw, None, 1 << 20, now)
        assert isinstance(checked, Invalid) and why in checked.reason, checked
    ok = validate(b'{"task": "ttl-body", "id": "r1", "ttl": 300}', None, 1 << 20, now)
    assert isinstance(ok, Valid) and ok.msg.ttl == 300


async def test_a_wire_messages_ttl_counts_from_its_not_before(
    client: Client, settings: Settings
) -> None:
    await client.connect()
    await client.publisher.ensure_queue("ttl-body")
    now = int(time.time() * 1000)
    expiring, running = new_run_id(), new_run_id()
    await publish_raw(
        settings,
        "ttl-body",
        [
            # Due now, 300 ms to start: queued longer than that before a worker comes.
            msgspec.json.encode(
                {"task": "ttl-body", "id": expiring, "ttl": 300, "not_before": now}
            ),
            msgspec.json.encode({"task": "ttl-body", "id": running, "ttl": 60_000}),
        ],
    )
    await asyncio.sleep(0.6)
    async with Worker([body], settings=settings):
        await eventually(lambda: _status_is(client, running, RunStatus.COMPLETED))
        await eventually(lambda: _status_is(client, expiring, RunStatus.EXPIRED))
    run = await client.get_run(expiring)
    assert run.expires_at is not None and _ms(run.expires_at) == now + 300
    await _expired(client, expiring)


@pytest.fixture
async def proxied(
    services: Services, namespace: str
) -> AsyncIterator[tuple[Client, Worker, Proxy]]:
    """A client on the real Redis, and a worker (of ttl-body) whose Redis traffic crosses
    a proxy that can throw a reply away (tests/test_lost_replies.py)."""
    proxy = Proxy(urlsplit(services.redis_url).port or 6379)
    await proxy.start()
    port = urlsplit(services.redis_url).port
    direct = Settings(
        amqp_url=services.amqp_url, redis_url=services.redis_url, namespace=namespace, lease_ttl=2.0
    )
    cut = msgspec.structs.replace(
        direct, redis_url=services.redis_url.replace(f":{port}/", f":{proxy.port}/")
    )
    try:
        async with Client(settings=direct) as client:
            for name in client.store.scripts.sha:
                await client.redis.script_load(source(name))
            worker = Worker([body], settings=cut, concurrency=2)
            await worker.start()
            try:
                yield client, worker, proxy
            finally:
                await worker.shutdown()
        await cleanup(direct)
    finally:
        await proxy.close()


async def test_a_lost_reply_to_an_expiring_claim_still_ends_it_expired_once(
    proxied: tuple[Client, Worker, Proxy],
) -> None:
    client, worker, proxy = proxied
    run = NewRun(new_run_id(), "ttl-body", "ttl-body", b"{}", [], None, 0, ttl_ms=200)
    await client.store.create([run])
    await asyncio.sleep(0.4)
    proxy.cut_reply_after(worker.store.scripts.sha["claim"].encode())
    message = RunMessage(task="ttl-body", id=run.run_id)
    await client.connect()
    await client.publisher.publish(
        [Outgoing("ttl-body", msgspec.json.encode(message), message_id=run.run_id)]
    )
    await eventually(lambda: _status_is(client, run.run_id, RunStatus.EXPIRED))
    await eventually(lambda: _cut(proxy))
    first = await client.get_run(run.run_id)
    # The claim sent again found it ended: it neither ran nor was ended a second time.
    await asyncio.sleep(1.0)
    assert await client.get_run(run.run_id) == first
    assert await client.redis.hget(client.store.keys.run(run.run_id), "crashes") == b"0"
    await _expired(client, run.run_id)


async def _cut(proxy: Proxy) -> bool:
    return proxy.cuts == 1


async def _status_is(client: Client, run_id: str, status: RunStatus) -> bool:
    view = await client.store.status(run_id)
    return view is not None and view.status is status


def test_a_declared_schedule_carries_its_tasks_ttl_to_its_ticks() -> None:
    from conveyor.scheduler.declared import declared_schedules

    @task(id="ttl-cron", ttl=timedelta(seconds=45), every=timedelta(minutes=1))
    async def ticking() -> None:
        pass

    [(_, with_ttl)] = declared_schedules({"ttl-cron": ticking})
    assert with_ttl.ttl_ms == 45_000
