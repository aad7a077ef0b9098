"""Tasks under rate and concurrency limits, for tests/test_limits.py (in the test process
and in `conveyor worker tests.tasks tests.limit_tasks`).

Each run records its start (wall time, run id, attempt) in a list of the run's namespace,
so a test reads every start across processes in order."""

from __future__ import annotations

import asyncio
import time

from conveyor import Concurrency, RateLimit, RateLimited, Retry, current_run, task
from conveyor.shared.context import current_context


def starts_key(namespace: str, task_id: str) -> str:
    return f"{namespace}:test:starts:{task_id}"


def running_key(namespace: str, task_id: str) -> str:
    return f"{namespace}:test:running:{task_id}"


async def _started() -> str:
    """Record this start; returns the namespace."""
    ctx = current_context()
    assert ctx is not None
    run = current_run()
    ns = ctx.store.settings.namespace
    await ctx.store.redis.rpush(
        starts_key(ns, run.task_id), f"{time.time():.4f} {run.id} {run.attempt}"
    )
    return ns


@task(id="lim-rate", rate_limit=RateLimit(5, per=1.0, burst=5), retry=Retry(max_attempts=1))
async def rate_limited(i: int) -> int:
    await _started()
    return i


@task(id="lim-429", rate_limit="50/s", retry=Retry(max_attempts=1))
async def calls_api(i: int, fail_first: bool = False) -> int:
    """Raises RateLimited(retry_after=3) on its first attempt when told to."""
    await _started()
    if fail_first and current_run().attempt == 1:
        raise RateLimited(retry_after="3")
    return i


@task(id="lim-slots", concurrency_limit=3, retry=Retry(max_attempts=3, min_delay=0.1))
async def holds_a_slot(seconds: float) -> None:
    """Counts the runs of its task running at once (across processes) at every start."""
    ns = await _started()
    ctx = current_context()
    assert ctx is not None
    running = running_key(ns, "lim-slots")
    now = await ctx.store.redis.incr(running)
    await ctx.store.redis.rpush(running + ":seen", now)
    try:
        await asyncio.sleep(seconds)
    finally:
        await ctx.store.redis.decr(running)


@task(
    id="lim-tenants",
    concurrency_limit=Concurrency(3, per_key=2, name="tenants"),
    retry=Retry(max_attempts=1),
)
async def per_tenant(tenant: str, seconds: float) -> str:
    await _started()
    await asyncio.sleep(seconds)
    return tenant


@task(id="lim-one", concurrency_limit=1, retry=Retry(max_attempts=1))
async def one_at_a_time(seconds: float) -> None:
    await _started()
    await asyncio.sleep(seconds)


@task(id="lim-slow-rate", rate_limit=RateLimit(1, per=60.0, burst=1), retry=Retry(max_attempts=1))
async def once_a_minute() -> None:
    await _started()
