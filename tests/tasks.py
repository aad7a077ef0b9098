"""Tasks the tests run, in-process and in worker processes (`conveyor worker tests.tasks`).

Task code records what it did in Redis under the run's namespace so that tests can count
executions across processes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from datetime import datetime

import msgspec

from conveyor import (
    NonRetryableError,
    Retry,
    RunFailed,
    Settings,
    TokenTimeout,
    create_token,
    current_run,
    run_step,
    sleep,
    step,
    task,
    wait_for_token,
)
from conveyor.shared.context import current_context
from conveyor.shared.redis_client import Redis, redis_client


class Point(msgspec.Struct):
    x: int
    y: int


@dataclasses.dataclass
class Box:
    label: str
    created: datetime


_redis: dict[int, Redis] = {}


def _r() -> Redis:
    # Inside a run, the worker's own Redis (from its settings): traces land beside the run.
    ctx = current_context()
    if ctx is not None:
        return ctx.store.redis
    loop = id(asyncio.get_running_loop())
    if loop not in _redis:
        _redis[loop] = redis_client(Settings())
    return _redis[loop]


async def record(event: str) -> None:
    """Append an event to the run's trace list (deleted with the run's namespace by the
    tests' cleanup, see conftest.py)."""
    run = current_run()
    key = trace_key(run.id)
    async with _r().pipeline(transaction=False) as pipe:
        pipe.rpush(key, f"{event}@{run.attempt}")
        pipe.expire(key, 600)
        await pipe.execute()


def trace_key(run_id: str) -> str:
    return f"conveyor-test:trace:{run_id}"


@task(id="echo", retry=Retry(max_attempts=1))
async def echo(value: str, times: int = 1) -> str:
    return value * times


@task(id="noop", retry=Retry(max_attempts=1))
async def noop() -> None:
    return None


@step()
async def make_point(x: int) -> Point:
    await record("make_point")
    return Point(x, x * 2)


@step()
async def make_box(label: str) -> Box:
    await record("make_box")
    return Box(label, datetime(2026, 1, 2, 3, 4, 5))


@step()
async def make_bytes(n: int) -> bytes:
    await record("make_bytes")
    return bytes(range(n))


@task(id="typed-steps", retry=Retry(max_attempts=2, min_delay=0.1, jitter=False))
async def typed_steps(fail_first: bool = True) -> dict[str, str]:
    point = await make_point(3)
    box = await make_box("b")
    raw = await make_bytes(4)
    assert isinstance(point, Point) and isinstance(box, Box) and isinstance(raw, bytes)
    assert isinstance(box.created, datetime)
    if fail_first and current_run().attempt == 1:
        raise RuntimeError("transient")
    return {"point": f"{point.x},{point.y}", "box": box.label, "bytes": raw.hex()}


@task(
    id="flaky", retry=Retry(max_attempts=4, min_delay=0.5, factor=2.0, max_delay=10, jitter=False)
)
async def flaky(succeed_on: int) -> int:
    await record("flaky")
    if current_run().attempt < succeed_on:
        raise RuntimeError(f"attempt {current_run().attempt} fails")
    return current_run().attempt


@task(id="fatal", retry=Retry(max_attempts=5, min_delay=0.1))
async def fatal() -> None:
    await record("fatal")
    raise NonRetryableError("this cannot work")


@step()
async def slow_step(name: str, seconds: float) -> str:
    await record(f"{name}:start")
    await asyncio.sleep(seconds)
    await record(f"{name}:end")
    return name


@task(id="three-steps", retry=Retry(max_attempts=3, min_delay=0.1))
async def three_steps(seconds: float = 1.0) -> list[str]:
    a = await slow_step("s1", 0.05)
    b = await slow_step("s2", seconds)
    c = await slow_step("s3", 0.05)
    return [a, b, c]


@task(id="sleeper", retry=Retry(max_attempts=1))
async def sleeper(seconds: float) -> str:
    await record("sleeper:start")
    await asyncio.sleep(seconds)
    await record("sleeper:end")
    return "slept"


@task(id="limited", max_duration=0.5, retry=Retry(max_attempts=3))
async def limited(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "done"


@task(id="poison", retry=Retry(max_attempts=5))
async def poison() -> None:
    await record("poison")
    os.kill(os.getpid(), signal.SIGKILL)


@task(id="bad-output", retry=Retry(max_attempts=3))
async def bad_output() -> object:
    return object()


@step()
async def bad_step() -> object:
    return object()


@task(id="bad-step", retry=Retry(max_attempts=3))
async def bad_step_task() -> None:
    await bad_step()


@task(id="gather-steps", retry=Retry(max_attempts=2, min_delay=0.1, jitter=False))
async def gather_steps(n: int) -> list[int]:
    async def square(i: int) -> int:
        await record(f"square{i}")
        await asyncio.sleep(0.01 * (n - i))
        return i * i

    values = await asyncio.gather(*(run_step("square", square, i) for i in range(n)))
    if current_run().attempt == 1:
        raise RuntimeError("retry to replay")
    return list(values)


@task(id="crash-after-steps", retry=Retry(max_attempts=3, min_delay=0.1))
async def crash_after_steps() -> list[str]:
    """Kills its worker on attempt 1 after the last checkpoint, before the outcome and ack."""
    a = await slow_step("s1", 0.01)
    b = await slow_step("s2", 0.01)
    c = await slow_step("s3", 0.01)
    await record("body-end")
    if current_run().attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return [a, b, c]


ALL = [
    echo,
    noop,
    typed_steps,
    flaky,
    fatal,
    three_steps,
    sleeper,
    limited,
    poison,
    bad_output,
    bad_step_task,
    gather_steps,
    crash_after_steps,
]


# -- steps, retries and trigger options (test_steps, test_retries, test_trigger_options) ----


@task(id="whoami", retry=Retry(max_attempts=1))
async def whoami() -> dict[str, str | int]:
    run = current_run()
    return {"id": run.id, "task_id": run.task_id, "attempt": run.attempt}


@step(retry=Retry(max_attempts=3, min_delay=0.05, factor=1.0, jitter=False))
async def shaky_step(fail_times: int) -> str:
    """Fails its first `fail_times` calls in a run; the step's own retry absorbs them."""
    await record("shaky")
    calls = int(await _r().llen(trace_key(current_run().id)))
    if calls <= fail_times:
        raise RuntimeError(f"shaky call {calls} fails")
    return f"ok after {calls}"


@task(id="step-retry", retry=Retry(max_attempts=1))
async def step_retry(fail_times: int) -> str:
    return await shaky_step(fail_times)


# Calls of the sync step per run id; only meaningful with the in-process worker fixture.
sync_calls: dict[str, int] = {}


def scale_point(x: int) -> Point:
    run_id = current_run().id
    sync_calls[run_id] = sync_calls.get(run_id, 0) + 1
    return Point(x, x * 10)


@task(id="sync-step", retry=Retry(max_attempts=2, min_delay=0.1, jitter=False))
async def sync_step(x: int) -> dict[str, int]:
    point = await run_step("scale", scale_point, x)
    if not isinstance(point, Point):
        raise NonRetryableError(f"the checkpoint came back as {type(point).__name__}")
    if current_run().attempt == 1:
        raise RuntimeError("retry to replay")
    return {"x": point.x, "y": point.y, "calls": sync_calls.get(current_run().id, 0)}


@task(id="always-fails", retry=Retry(max_attempts=3, min_delay=0.1, jitter=False))
async def always_fails() -> None:
    await record("always-fails")
    raise RuntimeError(f"attempt {current_run().attempt} fails")


# Delays 0.7 s and 1.5 s take three and four hops of the delay ladder (7 = 0b111 and
# 15 = 0b1111 units of 100 ms); the third delay (0.7 * (15/7)**2 s) is capped at 1.5 s.
@task(
    id="ladder",
    retry=Retry(max_attempts=4, min_delay=0.7, factor=15 / 7, max_delay=1.5, jitter=False),
)
async def ladder(succeed_on: int) -> int:
    if current_run().attempt < succeed_on:
        raise RuntimeError(f"attempt {current_run().attempt} fails")
    return current_run().attempt


@task(
    id="jittery", retry=Retry(max_attempts=3, min_delay=0.5, factor=2.0, max_delay=10, jitter=True)
)
async def jittery(succeed_on: int) -> int:
    if current_run().attempt < succeed_on:
        raise RuntimeError(f"attempt {current_run().attempt} fails")
    return current_run().attempt


ALL += [whoami, step_retry, sync_step, always_fails, ladder, jittery]


@task(id="nap", retry=Retry(max_attempts=1))
async def nap(seconds: float) -> str:
    """Touches nothing but the clock: it runs through a Redis outage unharmed."""
    await asyncio.sleep(seconds)
    return "rested"


# Fails its first attempt; the retry waits 3.2 s in one level of the delay ladder (32
# units of 100 ms, level 5), whose next hop is the work queue: a broker restart in those
# 3.2 s catches it on the last hop.
@task(id="late-retry", retry=Retry(max_attempts=2, min_delay=3.2, jitter=False))
async def late_retry(n: int) -> int:
    await record("late-retry")
    if current_run().attempt < 2:
        raise RuntimeError(f"attempt {current_run().attempt} fails")
    return n


ALL += [nap, late_retry]


# -- child runs and durable sleeps (tests/test_waits.py) ----------------------------------


@task(id="double", retry=Retry(max_attempts=1))
async def double(x: int) -> int:
    await record(f"double:{x}")
    return 2 * x


@task(id="flaky-double", retry=Retry(max_attempts=3, min_delay=0.1))
async def flaky_double(x: int) -> int:
    await record(f"flaky-double:{x}")
    if current_run().attempt == 1:
        raise RuntimeError("the first attempt fails")
    return 2 * x


@task(id="gather-doubles", retry=Retry(max_attempts=1))
async def gather_doubles() -> list[int]:
    await record("gather-doubles")
    return list(
        await asyncio.gather(
            double.trigger_and_wait(x=1), double.trigger_and_wait(x=2), double.trigger_and_wait(x=3)
        )
    )


@task(id="fan-out", retry=Retry(max_attempts=1))
async def fan_out(n: int, seconds: float = 0.0) -> int:
    results = await slow_double.batch_trigger_and_wait(
        [{"x": i, "seconds": seconds} for i in range(n)]
    )
    assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
    return sum(r.value or 0 for r in results)


@task(id="slow-double", retry=Retry(max_attempts=1))
async def slow_double(x: int, seconds: float = 0.0) -> int:
    await record(f"slow-double:{x}")
    await asyncio.sleep(seconds)
    return 2 * x


@task(id="catch-child-failure", retry=Retry(max_attempts=1))
async def catch_child_failure() -> str:
    try:
        await always_fails.trigger_and_wait()
    except RunFailed as exc:
        return f"{exc.status}: {exc.error}"
    return "no failure"


@task(id="middle", retry=Retry(max_attempts=1))
async def middle(x: int) -> int:
    return await flaky_double.trigger_and_wait(x=x) + 1


@task(id="top", retry=Retry(max_attempts=1))
async def top(x: int) -> int:
    return await middle.trigger_and_wait(x=x) * 10


@task(id="dozer", retry=Retry(max_attempts=1))
async def dozer(seconds: float) -> float:
    """Sleeps durably between two steps; returns how long the sleep took (wall clock)."""
    began = await run_step("before", _now)
    await sleep(seconds)
    ended = await run_step("after", _now)
    return ended - began


async def _now() -> float:
    return time.time()


ALL += [double, flaky_double, gather_doubles, fan_out, slow_double, catch_child_failure]
ALL += [middle, top, dozer]


@task(id="approval", retry=Retry(max_attempts=1))
async def approval(timeout: float) -> dict[str, object]:
    token = await create_token(timeout=timeout)
    await run_step("announce", record, f"token:{token.id}")
    try:
        data = await wait_for_token(token)
    except TokenTimeout:
        return {"timed_out": True}
    return {"data": data}


ALL += [approval]


async def _charge() -> str | None:
    key = current_run().step_idempotency_key
    await record(f"charge:{key}")
    if current_run().attempt == 1:
        raise RuntimeError("the payment API timed out (it may have charged)")
    return key


@task(id="pay", retry=Retry(max_attempts=2, min_delay=0.1, jitter=False))
async def pay() -> dict[str, str | None]:
    outside = current_run().step_idempotency_key
    inside = await run_step("charge", _charge)
    return {"outside": outside, "inside": inside}


ALL += [pay]


@task(id="spawner", retry=Retry(max_attempts=1))
async def spawner() -> str:
    handle = await echo.trigger(value="child")
    return handle.id


ALL += [spawner]


@task(id="middle-slow", retry=Retry(max_attempts=1))
async def middle_slow(seconds: float) -> int:
    return await slow_double.trigger_and_wait(x=1, seconds=seconds)


@task(id="top-slow", retry=Retry(max_attempts=1))
async def top_slow(seconds: float) -> int:
    return await middle_slow.trigger_and_wait(seconds=seconds)


ALL += [middle_slow, top_slow]


@task(id="ticked", retry=Retry(max_attempts=1))
async def ticked() -> int | None:
    """Fired by schedules (test_schedules, test_cron_faults): returns its scheduled time."""
    await record("tick")
    at = current_run().scheduled_at
    return None if at is None else int(at.timestamp() * 1000)


ALL += [ticked]
