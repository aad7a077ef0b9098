"""Tasks that log, for tests/test_logs.py and tests/test_metrics.py; worker processes run
them as `conveyor worker tests.tasks tests.log_tasks`."""

from __future__ import annotations

import asyncio
import logging

from conveyor import (
    Concurrency,
    NonRetryableError,
    RateLimit,
    Retry,
    current_run,
    step,
    task,
)
from conveyor.shared.context import current_context

log = logging.getLogger("tests.chatty")
other = logging.getLogger("tests.other")
# Explicit levels: whatever the root logger's, these loggers' records are all made.
log.setLevel(logging.DEBUG)
other.setLevel(logging.INFO)


@step()
async def greet() -> str:
    log.info("greeting once")
    return "hello"


@task(id="chatty", retry=Retry(max_attempts=2, min_delay=0.1, jitter=False))
async def chatty() -> str:
    attempt = current_run().attempt
    await greet()
    log.debug("debug on attempt %d", attempt)
    log.info("info on attempt %d", attempt)
    await asyncio.to_thread(other.warning, "from a thread on attempt %d", attempt)
    if attempt == 1:
        try:
            raise RuntimeError("first attempt fails")
        except RuntimeError:
            other.exception("failing attempt %d", attempt)
            raise
    return "ok"


@task(id="flood", retry=Retry(max_attempts=1))
async def flood(lines: int, width: int = 50) -> int:
    for i in range(lines):
        log.info("line %d %s", i, "x" * width)
    return lines


@task(id="log-and-hang", retry=Retry(max_attempts=2))
async def log_and_hang(seconds: float) -> str:
    attempt = current_run().attempt
    log.info("started attempt %d", attempt)
    if attempt == 1:
        await asyncio.sleep(seconds)  # killed meanwhile
    log.info("done on attempt %d", attempt)
    return "done"


@task(id="metered-ok", retry=Retry(max_attempts=1))
async def metered_ok() -> int:
    await greet()
    return 1


@task(id="metered-fail", retry=Retry(max_attempts=3))
async def metered_fail() -> None:
    raise NonRetryableError("never works")


@task(id="metered-rate", rate_limit=RateLimit(20, per=1.0, burst=1), retry=Retry(max_attempts=1))
async def metered_rate() -> None:
    return None


@task(id="metered-slot", concurrency_limit=Concurrency(1), retry=Retry(max_attempts=1))
async def metered_slot() -> None:
    await asyncio.sleep(0.2)


@task(id="unlogged", retry=Retry(max_attempts=1))
async def unlogged() -> str:
    """Its logs key is not a list: the records cannot be saved, the run ends all the same."""
    ctx = current_context()
    assert ctx is not None
    await ctx.store.redis.set(ctx.store.keys.logs(ctx.info.id), "not a list")
    log.info("this record cannot be saved")
    return "done"


ALL = [unlogged, chatty, flood, log_and_hang, metered_ok, metered_fail, metered_rate, metered_slot]
