"""`python -m benchmarks schedules`: the CPU a `conveyor scheduler` leader uses with
10,000 every-minute cron schedules (issue 10; the figure is in docs/architecture.md).

In a namespace of its own: SCHEDULES (10,000) schedules CRON (`* * * * *`) of one task
are created, one real `conveyor scheduler` process is started and, once it leads, its CPU
time (from /proc) is read over SECONDS (120: two whole minutes, from 5 s after a minute
boundary). Every schedule fires at each minute, so a minute holds one burst of SCHEDULES
runs created and published (no worker takes them) and otherwise the idle passes over the
due index. Reported: CPU seconds per second over the window, the busiest and the median
second, the ticks fired, and how late the last run of each burst was created after its
minute. Only services on 127.0.0.1 are used; everything is deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from benchmarks.throughput import check_local, run_main
from conveyor import Client, Settings
from conveyor.broker.purge import purge_namespace
from conveyor.shared.keys import Keys

TASK = "bench-scheduled"
EVERY_MINUTE = "* * * * *"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_scheduler(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "conveyor", "scheduler", "--log-level", "WARNING"], env=env
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(30)


async def create(client: Client, n: int, cron: str) -> None:
    sem = asyncio.Semaphore(50)

    async def one(i: int) -> None:
        async with sem:
            await client.schedules.create(TASK, cron, key=f"s{i:05d}")

    await asyncio.gather(*(one(i) for i in range(n)))


async def leading(settings: Settings, timeout: float = 30) -> None:
    r = aioredis.Redis.from_url(settings.redis_url)
    try:
        deadline = time.monotonic() + timeout
        while not await r.exists(Keys(settings.namespace).leader):
            if time.monotonic() > deadline:
                raise TimeoutError
            await asyncio.sleep(0.1)
    finally:
        await r.aclose()


async def lateness(settings: Settings) -> tuple[int, dict[int, float]]:
    """The ticks fired, and minute (epoch ms) -> seconds from it to the creation of its
    last run."""
    r = aioredis.Redis.from_url(settings.redis_url)
    try:
        keys = [
            k async for k in r.scan_iter(match=f"{settings.namespace}:{{cron:*}}:run", count=2000)
        ]
        async with r.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.hget(k, "created_at")
            created: list[Any] = await pipe.execute()
    finally:
        await r.aclose()
    last: dict[int, int] = {}
    for k, at in zip(keys, created, strict=True):
        minute = int(k.decode().rsplit("}", 1)[0].rsplit(":", 1)[1])
        last[minute] = max(last.get(minute, 0), int(at))
    return len(keys), {minute: (at - minute) / 1000 for minute, at in sorted(last.items())}


async def run(args: argparse.Namespace) -> int:
    base = Settings.from_env()
    check_local(base.amqp_url, "CONVEYOR_AMQP_URL")
    check_local(base.redis_url, "CONVEYOR_REDIS_URL")
    settings = Settings.from_env(namespace=f"bsched{secrets.token_hex(4)}")
    env = {**os.environ, "CONVEYOR_NAMESPACE": settings.namespace}
    proc: subprocess.Popen[bytes] | None = None
    try:
        async with Client(settings=settings) as client:
            started = time.monotonic()
            await create(client, args.schedules, args.cron)
            print(f"created {args.schedules} schedules in {time.monotonic() - started:.1f}s")
            proc = start_scheduler(env)
            await leading(settings)
            if args.cron == EVERY_MINUTE:
                # From just after a minute's burst, so the window holds whole minutes.
                await asyncio.sleep(60 - time.time() % 60 + 5)
            samples: list[float] = []
            t0, c0 = time.monotonic(), cpu_seconds(proc.pid)
            last_t, last_c = t0, c0
            while time.monotonic() - t0 < args.seconds:
                await asyncio.sleep(1)
                now, cpu = time.monotonic(), cpu_seconds(proc.pid)
                samples.append((cpu - last_c) / (now - last_t))
                last_t, last_c = now, cpu
            total = (last_c - c0) / (last_t - t0)
            fired, late = await lateness(settings)
        print(
            f"{args.schedules} schedules {args.cron!r}, {args.seconds:.0f} s: scheduler CPU "
            f"{total * 100:.1f}% of a core on average (busiest second {max(samples) * 100:.0f}%, "
            f"median second {statistics.median(samples) * 100:.2f}%)"
        )
        print(
            f"{fired} ticks fired in {len(late)} bursts; the last run of each created this long after its minute (s): "
            + ", ".join(f"{v:.2f}" for v in late.values())
        )
        return 0
    finally:
        if proc is not None:
            stop(proc)
        await purge_namespace(settings, [TASK])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks schedules", description=__doc__)
    parser.add_argument("--schedules", type=int, default=10_000)
    parser.add_argument("--cron", default=EVERY_MINUTE, help="the schedules' expression")
    parser.add_argument("--seconds", type=float, default=120.0, help="the measured window")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("schedules benchmark", run(parse_args(argv)))
