"""The scenarios, each measured the same way for every system.

Every figure comes from the stamps the tasks write (stamps.py), never from a system's own
bookkeeping: a drain rate is the number of tasks over the time from the first task's
stamp to the last one's, so worker start-up is not counted; a latency is a task's stamp
minus the moment its trigger call started, both from the same clock; a fan-out runs from
the parent's first stamp to the one it writes once it holds every child's result.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks.throughput import pct

from .processes import Workers
from .stamps import (
    CHAIN_FIRST,
    CHAIN_LAST,
    FANOUT_CHILD,
    FANOUT_END,
    FANOUT_START,
    FANOUT_WRONG,
    Reader,
)
from .systems import System


class ScenarioError(Exception):
    pass


class Stage:
    """What the scenarios share: the stamps of the run and its worker processes."""

    def __init__(self, stamps: Path, wait_timeout: float) -> None:
        self.reader = Reader(stamps)
        self.stamps_env = {"BENCH_STAMPS": str(stamps)}
        self.workers = Workers(stamps / "workers.log")
        self.wait_timeout = wait_timeout

    def start(self, system: System, processes: int, backend: bool) -> None:
        env = {**system.worker_env(backend), **self.stamps_env}
        self.workers.start(system.worker_commands(processes, backend), env)

    async def wait_stamps(self, count: int, what: str) -> None:
        deadline = time.monotonic() + self.wait_timeout
        while self.reader.count() < count:
            self.workers.check_alive(what)
            if time.monotonic() > deadline:
                raise ScenarioError(
                    f"{what}: {self.reader.count()} of {count} tasks ran within "
                    f"{self.wait_timeout:.0f}s; the end of the workers' output:\n"
                    + self.workers.tail()
                )
            await asyncio.sleep(0.02)


async def drain(
    stage: Stage, system: System, *, count: int, processes: int, backend: bool, fill: str
) -> dict[str, float]:
    """Enqueue `count` no-op tasks with no worker running, then start the workers and time
    the drain. The workers keep running for the next scenario (stop them after)."""
    stage.reader.mark()
    started = time.perf_counter()
    await system.enqueue_noops(count, fill)
    enqueue_s = time.perf_counter() - started
    stage.start(system, processes, backend)
    await stage.wait_stamps(count, f"{system.name} drain")
    times = sorted(t for _tag, t in stage.reader.read())
    return {
        "tasks_per_s": (len(times) - 1) / (times[-1] - times[0]),
        "enqueue_per_s": count / enqueue_s,
    }


async def latency(stage: Stage, system: System, *, count: int, rate: float) -> dict[str, float]:
    """With the workers running: `count` tasks triggered at a steady `rate` (open loop:
    each call starts on schedule whatever the others do); each task's start minus the
    start of its trigger call."""
    stage.reader.mark()
    await paced(count, rate, system.send_stamp)
    await stage.wait_stamps(count, f"{system.name} latency")
    delays = [(t - tag) * 1000 for tag, t in stage.reader.read()]
    return {"p50_ms": pct(delays, 50), "p95_ms": pct(delays, 95), "p99_ms": pct(delays, 99)}


async def chain(stage: Stage, system: System, *, count: int) -> dict[str, float]:
    """`count` three-call chains enqueued, then drained by one worker process: chains/s
    from the first chain's first call to the last chain's last call."""
    stage.reader.mark()
    await system.enqueue_chains(count)
    stage.start(system, 1, backend=False)
    await stage.wait_stamps(2 * count, f"{system.name} chain")
    records = stage.reader.read()
    first = min(t for tag, t in records if tag == CHAIN_FIRST)
    last = max(t for tag, t in records if tag == CHAIN_LAST)
    return {"chains_per_s": count / (last - first)}


async def fanout(stage: Stage, system: System, *, count: int) -> dict[str, float]:
    """One parent enqueued, then one worker process: the parent starts `count` children
    and collects their results. Children/s from the parent's start to the moment it holds
    every result; and how long that moment came after the last child started."""
    stage.reader.mark()
    await system.send_fanout(count)
    # the peers collect results through their result backends; conveyor always has them
    stage.start(system, 1, backend=system.has_backend)
    await stage.wait_stamps(count + 2, f"{system.name} fan-out")
    records = stage.reader.read()
    tags = [tag for tag, _t in records]
    what = f"{system.name} fan-out"
    if FANOUT_WRONG in tags:
        raise ScenarioError(f"{what}: the parent collected results its children did not return")
    if tags.count(FANOUT_START) != 1 or tags.count(FANOUT_END) != 1:
        raise ScenarioError(
            f"{what}: {tags.count(FANOUT_START)} parent starts, {tags.count(FANOUT_CHILD)} "
            f"child runs and {tags.count(FANOUT_END)} collections; 1, {count} and 1 expected"
        )
    start = next(t for tag, t in records if tag == FANOUT_START)
    end = next(t for tag, t in records if tag == FANOUT_END)
    last_child = max(t for tag, t in records if tag == FANOUT_CHILD)
    return {"children_per_s": count / (end - start), "collect_ms": (end - last_child) * 1000}


async def paced(count: int, rate: float, call: Callable[[], Awaitable[Any]]) -> None:
    """Start `count` calls at `rate` per second, on schedule; wait for all of them."""
    pending: list[asyncio.Task[Any]] = []
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.ensure_future(call()))
    await asyncio.gather(*pending)


def summary(values: list[float]) -> dict[str, float]:
    """Median and spread of one figure over the repeats."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
