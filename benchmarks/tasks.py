"""The tasks the benchmark runs, in `conveyor worker benchmarks.tasks` processes.

Each task has its own queue (the default: the task id), so a benchmark phase can watch
one queue drain. When CONVEYOR_BENCH_COUNT names a file, the worker counts its Redis and
AMQP round trips and writes them there on exit (see benchmarks/counting.py); the timed
measurements never set it.
"""

from __future__ import annotations

import os
import time

from conveyor import step, task

from . import counting

counting.install_if_asked()
if os.environ.get("CONVEYOR_BENCH_TRACING") == "noop":
    from .otlp import install_noop_exporter

    install_noop_exporter()


@task(id="bench-noop")
async def noop() -> None:
    """Does nothing: what is left is conveyor's own cost per run."""


@task(id="bench-stamp")
async def stamp() -> float:
    """Returns the moment the task function started (time.time()), for trigger-to-start."""
    return time.time()


@step(name="bench-nothing")
async def nothing() -> int:
    return 1


@task(id="bench-steps")
async def steps(n: int) -> float:
    """Calls `n` checkpointed no-op steps; returns the seconds they took inside the task."""
    started = time.perf_counter()
    for _ in range(n):
        await nothing()
    return time.perf_counter() - started


ALL = [noop, stamp, steps]
