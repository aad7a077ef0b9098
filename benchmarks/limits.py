"""`python -m benchmarks limits`: how closely rate limits hold and what a concurrency
limit costs a drain (issue 10), with real `conveyor worker benchmarks.limit_tasks`
processes (2 by default).

1. Rate accuracy: with the workers running, a backlog of rate x SECONDS + burst no-op
   runs under a rate limit is triggered at once; every start is recorded (stamps, in the
   worker). Reported: starts/s over the steady part (10%..90% of the starts) against the
   limit, the most starts in any 1 s window against rate x 1 s + burst, and how late the
   starts were against the limit's ideal schedule (the first `burst` at the first start,
   then one per interval).
2. Drain: N no-op runs triggered with no worker running, then the workers start and drain
   them; with no limit, with a concurrency limit of 50 and of 10, interleaved over the
   repeats. Reported: runs/s (first start..last start, and steady 10%..90%) and the ratio
   of limited to unlimited medians from the same run.
3. Round trips per run in one counting worker (benchmarks/counting.py), limit on and off.

Everything lives in a random namespace that is deleted at the end; only services on
127.0.0.1 are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aio_pika
import msgspec
import redis.asyncio as aioredis

from benchmarks.compare.apps.settings import AppSettings
from benchmarks.compare.machine import describe
from benchmarks.compare.stamps import Reader
from benchmarks.limit_tasks import ALL, DRAIN_TASKS, RATE_TASKS
from benchmarks.throughput import (
    TERMINAL_BYTES,
    BenchError,
    WorkerPool,
    _cpu_seconds,
    _divide,
    _read_json,
    _server_pids,
    check_local,
    chunks,
    cleanup,
    pct,
    round_trips,
    run_main,
)
from conveyor import Client, Settings
from conveyor._task import Task
from conveyor.broker.topology import Topology
from conveyor.shared.limits import RateLimit

MODULE = "benchmarks.limit_tasks"
QUEUES = [t.queue for t in ALL]
BATCH = 500


class Sizes(msgspec.Struct, frozen=True):
    rate_seconds: float  # how long each rate backlog lasts at its limit
    drain: int  # runs per drain
    count_runs: int  # runs per variant in the counting pass
    repeats: int


FULL = Sizes(12.0, 10_000, 2_000, 3)
SMOKE = Sizes(1.0, 200, 100, 1)


# -- figures -------------------------------------------------------------------------------


def rate_figures(starts: Sequence[float], limit: RateLimit) -> dict[str, float]:
    """Starts (s, sorted) under a rate limit against what the limit allows."""
    n = len(starts)
    rate = limit.rate / limit.per
    interval = limit.per / limit.rate
    # Steady: past the initial burst and the first tenth, up to the last tenth.
    lo, hi = max(n // 10, min(limit.burst, n // 2)), n * 9 // 10
    steady = (hi - lo) / (starts[hi] - starts[lo]) if starts[hi] > starts[lo] else float("nan")
    worst = most_in_a_second(starts)
    # Again once the backlog is past its first tenth: the whole backlog is deferred
    # round the ladder at the start, and runs whose hops were slow then start together.
    worst_after = most_in_a_second(starts[lo:])
    # The ideal schedule: `burst` starts at once, then one every interval.
    late = [
        (t - (starts[0] + max(0, k + 1 - limit.burst) * interval)) * 1000
        for k, t in enumerate(starts)
    ]
    return {
        "runs": n,
        "limit_per_s": rate,
        "steady_per_s": steady,
        "steady_ratio": steady / rate,
        "worst_1s": worst,
        "worst_1s_after": worst_after,
        "allowed_1s": rate + limit.burst,
        "late_p50_ms": pct(late, 50),
        "late_p99_ms": pct(late, 99),
        "late_min_ms": min(late),
    }


def most_in_a_second(starts: Sequence[float]) -> int:
    """The most starts in any window [t, t + 1 s) of sorted start times."""
    worst, j = 0, 0
    for i in range(len(starts)):
        while j < len(starts) and starts[j] < starts[i] + 1.0:
            j += 1
        worst = max(worst, j - i)
    return worst


def drain_figures(starts: Sequence[float]) -> dict[str, float]:
    n = len(starts)
    lo, hi = n // 10, n * 9 // 10
    span = starts[-1] - starts[0]
    return {
        "runs": n,
        "runs_per_s": (n - 1) / span if span > 0 else float("nan"),
        "steady_per_s": (hi - lo) / (starts[hi] - starts[lo])
        if starts[hi] > starts[lo]
        else float("nan"),
    }


# -- the benchmark -------------------------------------------------------------------------


class LimitBench:
    def __init__(self, settings: Settings, sizes: Sizes, workers: int, stamps: Path) -> None:
        self.settings = settings
        self.sizes = sizes
        self.workers = workers
        self.stamps = Reader(stamps)
        self.stamp_env = {"BENCH_STAMPS": str(stamps)}
        self.pool = WorkerPool(settings, 100, module=MODULE)
        self.server_pids = _server_pids()
        self.client = Client(settings=settings)
        self.names = Topology(settings).names
        self._amqp: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None

    async def open(self) -> None:
        await self.client.__aenter__()  # Task.trigger goes through this client
        await self.client.connect()
        for queue in QUEUES:
            await self.client.publisher.ensure_queue(queue)
        self._amqp = await aio_pika.connect(self.settings.amqp_url)
        self._channel = await self._amqp.channel()

    async def close(self) -> None:
        self.pool.kill()
        try:
            if self._amqp is not None:
                await self._amqp.close()
        finally:
            await self.client.__aexit__(None, None, None)

    async def start_workers(self, count: int, env: Mapping[str, str] | None = None) -> None:
        self.pool.start(count, env={**self.stamp_env, **(env or {})})
        deadline = time.monotonic() + 60
        assert self._channel is not None
        for queue in QUEUES:
            name = self.names.queue(queue)
            while True:
                declared = await self._channel.declare_queue(name, passive=True)
                if (declared.declaration_result.consumer_count or 0) >= count:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"{count} worker(s) did not start consuming in 60s")
                await asyncio.sleep(0.05)

    async def trigger(self, task: Task[Any, Any], n: int) -> list[str]:
        ids: list[str] = []
        for part in chunks([{"tag": 0.0}] * n, BATCH):
            ids += [h.id for h in await task.batch_trigger(part)]
        return ids

    async def starts(self, n: int, timeout: float) -> list[float]:
        """Wait for n starts recorded since the last mark; their times, sorted."""
        deadline = time.monotonic() + timeout
        while self.stamps.count() < n:
            if time.monotonic() > deadline:
                raise BenchError(f"{self.stamps.count()} of {n} runs started in {timeout:.0f}s")
            await asyncio.sleep(0.05)
        return sorted(t for _, t in self.stamps.read())

    async def rate_pass(self, task: Task[Any, Any]) -> dict[str, float]:
        limit = task.rate_limit
        assert limit is not None
        n = round(limit.rate / limit.per * self.sizes.rate_seconds) + limit.burst
        self.stamps.mark()
        await self.trigger(task, n)
        timeout = self.sizes.rate_seconds * 3 + 30
        return rate_figures(await self.starts(n, timeout), limit)

    async def drain(self, task: Task[Any, Any]) -> dict[str, float]:
        n = self.sizes.drain
        await self.trigger(task, n)
        self.stamps.mark()
        await self.start_workers(self.workers)
        cpu_before = self.cpu_seconds()
        starts = await self.starts(n, timeout=max(60.0, n / 50))
        cpu = {k: (v - cpu_before[k]) * 1e6 / n for k, v in self.cpu_seconds().items()}
        await self.pool.stop()
        return {**drain_figures(starts), **{f"cpu_us_{k}": v for k, v in cpu.items()}}

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far of the workers, redis-server and the RabbitMQ node (the
        servers' include other clients' load)."""
        return {
            "workers": sum(_cpu_seconds(p.pid) for p in self.pool.procs),
            **{k: sum(_cpu_seconds(pid) for pid in pids) for k, pids in self.server_pids.items()},
        }

    async def count(self, task: Task[Any, Any]) -> dict[str, float]:
        """Round trips per run of one counting worker draining count_runs runs."""
        ids = await self.trigger(task, self.sizes.count_runs)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "counts.json")
            await self.start_workers(1, env={"CONVEYOR_BENCH_COUNT": path})
            await self.wait_ended(ids, timeout=120.0)
            await self.pool.stop()
            raw: dict[str, int] = _read_json(path)
        per_run = {
            k: v
            for k, v in raw.items()
            if not k.startswith("amqp rpc") and not k.startswith("redis CONFIG")
        }
        return _divide(per_run, len(ids))

    async def wait_ended(self, ids: Sequence[str], timeout: float) -> None:
        redis: aioredis.Redis = self.client.redis
        keys = self.client.store.keys
        deadline = time.monotonic() + timeout
        pending = list(ids)
        while pending:
            left: list[str] = []
            for part in chunks(pending, 2000):
                async with redis.pipeline(transaction=False) as pipe:
                    for run_id in part:
                        pipe.hget(keys.run(run_id), "status")
                    statuses = await pipe.execute()
                left += [i for i, s in zip(part, statuses, strict=True) if s not in TERMINAL_BYTES]
            pending = left
            if pending and time.monotonic() > deadline:
                raise BenchError(f"{len(pending)} runs did not end within {timeout:.0f}s")
            await asyncio.sleep(0.05)

    async def run(self, count: bool) -> dict[str, Any]:
        rates: dict[str, list[dict[str, float]]] = {label: [] for label in RATE_TASKS}
        drains: dict[str, list[dict[str, float]]] = {label: [] for label in DRAIN_TASKS}
        print(f"== rate accuracy, {self.workers} workers", flush=True)
        await self.start_workers(self.workers)
        for r in range(self.sizes.repeats):
            for label, task in RATE_TASKS.items():
                figures = await self.rate_pass(task)
                rates[label].append(figures)
                print(
                    f"  [{r + 1}] {label:18} {figures['steady_per_s']:8.1f} starts/s, "
                    f"worst 1 s {figures['worst_1s']:.0f} of {figures['allowed_1s']:.0f}",
                    flush=True,
                )
        await self.pool.stop()
        print(f"== drains of {self.sizes.drain:,} no-op runs, {self.workers} workers", flush=True)
        order = list(DRAIN_TASKS.items())
        for r in range(self.sizes.repeats):
            # Rotated each repeat, so no variant always runs first or last.
            for label, task in order[r % len(order) :] + order[: r % len(order)]:
                figures = await self.drain(task)
                drains[label].append(figures)
                print(f"  [{r + 1}] {label:18} {figures['runs_per_s']:8,.0f} runs/s", flush=True)
        counts: dict[str, dict[str, float]] = {}
        if count:
            print("== counting round trips, 1 worker", flush=True)
            for label, task in DRAIN_TASKS.items():
                counts[label] = await self.count(task)
        return {"rates": rates, "drains": drains, "round_trips": counts}


# -- report --------------------------------------------------------------------------------


def median(rows: Sequence[Mapping[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def spread(rows: Sequence[Mapping[str, float]], key: str, fmt: str) -> str:
    values = [r[key] for r in rows]
    text = format(statistics.median(values), fmt)
    if len(values) > 1:
        text += f" ({format(min(values), fmt)}-{format(max(values), fmt)})"
    return text


def report(results: Mapping[str, Any], workers: int) -> str:
    rates, drains, counts = results["rates"], results["drains"], results["round_trips"]
    repeats = len(next(iter(drains.values())))
    lines = [
        f"Medians of {repeats} repeat(s), the spread (min-max) in brackets; {workers} worker "
        "processes, --concurrency 100 each.",
        "",
        "## Rate accuracy",
        "",
        "| limit | runs | starts/s (steady) | of the limit | most starts in 1 s | the same "
        "past the first 10% | allowed (rate x 1 s + burst) | late p50 ms | late p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, rows in rates.items():
        lines.append(
            f"| {label} | {rows[0]['runs']:,.0f} | {spread(rows, 'steady_per_s', '.1f')} | "
            f"{median(rows, 'steady_ratio'):.3f}x | {spread(rows, 'worst_1s', '.0f')} | "
            f"{spread(rows, 'worst_1s_after', '.0f')} | "
            f"{rows[0]['allowed_1s']:.0f} | {spread(rows, 'late_p50_ms', '.0f')} | "
            f"{spread(rows, 'late_p99_ms', '.0f')} |"
        )
    free = median(drains["no limit"], "runs_per_s")
    free_steady = median(drains["no limit"], "steady_per_s")
    lines += [
        "",
        "## Drain with a concurrency limit",
        "",
        "| variant | runs/s (first..last start) | of no limit | runs/s (steady 10%..90%) "
        "| of no limit | CPU us/run: workers | Redis | RabbitMQ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, rows in drains.items():
        lines.append(
            f"| {label} | {spread(rows, 'runs_per_s', ',.0f')} | "
            f"{median(rows, 'runs_per_s') / free:.2f}x | {spread(rows, 'steady_per_s', ',.0f')} | "
            f"{median(rows, 'steady_per_s') / free_steady:.2f}x | "
            f"{median(rows, 'cpu_us_workers'):,.0f} | {median(rows, 'cpu_us_redis'):,.0f} | "
            f"{median(rows, 'cpu_us_rabbitmq'):,.0f} |"
        )
    if counts:
        lines += [
            "",
            "## Round trips per run (one counting worker)",
            "",
            "| variant | Redis | AMQP publishes | deliveries | acks | detail |",
            "|---|---|---|---|---|---|",
        ]
        for label, c in counts.items():
            redis_rt, amqp_rt = round_trips(c)
            detail = ", ".join(f"{name} {v:.2f}" for name, v in sorted(c.items()))
            lines.append(
                f"| {label} | {redis_rt:.2f} | {amqp_rt:.2f} | {c.get('amqp deliver', 0):.2f} | "
                f"{c.get('amqp ack', 0):.2f} | {detail} |"
            )
    return "\n".join(lines)


def header(machine: Mapping[str, Any], seconds: float) -> str:
    return (
        "# Rate and concurrency limits\n\n"
        f"Written by `python -m benchmarks limits` on {machine['date']}, commit "
        f"{machine['commit']}.\n"
        f"Machine: {machine['cpus']} CPUs ({machine['cpu']}), {machine['memory_gib']} GiB, "
        f"{machine['os']}; RabbitMQ {machine['rabbitmq']} and Redis {machine['redis']} on the "
        f"same machine; Python {machine['python']}. Load average "
        f"{machine['load_average_start']} at the start, {os.getloadavg()[0]:.2f} at the end; "
        f"the run took {seconds:.0f} s. How each figure is measured: benchmarks/README.md.\n"
    )


# -- entry point ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks limits", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3")
    parser.add_argument("--no-count", action="store_true", help="skip the round-trip counting")
    parser.add_argument("--out", metavar="FILE", help="also write the report (markdown) there")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this long")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env(namespace=f"blim{secrets.token_hex(4)}")
    check_local(settings.amqp_url, "CONVEYOR_AMQP_URL")
    check_local(settings.redis_url, "CONVEYOR_REDIS_URL")
    sizes = SMOKE if args.smoke else FULL
    if args.repeats is not None:
        if args.repeats < 1:
            raise BenchError("--repeats takes 1 or more")
        sizes = msgspec.structs.replace(sizes, repeats=args.repeats)
    if not 1 <= args.workers <= 8:
        raise BenchError("--workers takes 1 to 8 processes")
    machine = await describe(
        AppSettings(settings.namespace, settings.amqp_url, settings.redis_url, False)
    )
    print(
        f"limits benchmark: namespace {settings.namespace}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="conveyor-limits-") as stamps:
        bench = LimitBench(settings, sizes, args.workers, Path(stamps))
        try:
            async with asyncio.timeout(args.timeout):
                await bench.open()
                results = await bench.run(count=not args.no_count)
        finally:
            try:
                await bench.close()
            finally:
                await cleanup(settings, QUEUES)
    text = report(results, args.workers)
    print("\n" + text)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    if args.out:
        document = header(machine, time.monotonic() - started) + "\n" + text + "\n"
        await asyncio.to_thread(Path(args.out).write_text, document)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("limits benchmark", run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
