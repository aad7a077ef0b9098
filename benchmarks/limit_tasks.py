"""The tasks of the limits benchmark (benchmarks/limits.py), in `conveyor worker
benchmarks.limit_tasks` processes.

Every task is a no-op that records its start, (tag, time.time()), in a file of its
process (benchmarks/compare/stamps.py: one write syscall, no Redis or AMQP traffic), so
the start times of all workers are read back without adding to what is measured. Each
task has its own queue (its id) and its own limit (named after the task), so phases do
not share limiter state. CONVEYOR_BENCH_COUNT turns on round-trip counting, as in
benchmarks/tasks.py.
"""

from __future__ import annotations

from conveyor import RateLimit, task

from . import counting
from .compare.stamps import record

counting.install_if_asked()

FAST_RATE = RateLimit(200, per=1.0, burst=20)
SLOW_RATE = RateLimit.parse("20/s")  # bursts to its rate: 20


@task(id="lim-bench-fast", rate_limit=FAST_RATE)
async def fast(tag: float) -> None:
    record(tag)


@task(id="lim-bench-slow", rate_limit=SLOW_RATE)
async def slow(tag: float) -> None:
    record(tag)


@task(id="lim-bench-free")
async def free(tag: float) -> None:
    record(tag)


@task(id="lim-bench-slots50", concurrency_limit=50)
async def slots50(tag: float) -> None:
    record(tag)


@task(id="lim-bench-slots10", concurrency_limit=10)
async def slots10(tag: float) -> None:
    record(tag)


RATE_TASKS = {"200/s, burst 20": fast, "20/s, burst 20": slow}
DRAIN_TASKS = {"no limit": free, "concurrency 50": slots50, "concurrency 10": slots10}
ALL = [fast, slow, free, slots50, slots10]
