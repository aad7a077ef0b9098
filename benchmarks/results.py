"""`python -m benchmarks results`: many `handle.result()` awaited at once, as a user would.

N no-op runs are triggered with no worker running, N `result()` calls are awaited with
asyncio.gather, then one worker process drains the runs. With `--no-broker` the runs are
only created in Redis and a process ends them with the worker's own scripts (claim and
finish, through RunStore): no RabbitMQ, and nothing but result() in the client. Reported: how many waits
returned and how the others failed, the time from the worker's start to the last wait's
return and from the last run's end to it (how late the last wait woke), the client's CPU
time over the waits, and the most Redis connections the client's pool held at once.

Also runnable as `python benchmarks/results.py` from a checkout (PYTHONPATH=that
checkout), to measure an older version of conveyor with the same script.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from benchmarks.tasks import noop
from benchmarks.throughput import ROOT, BenchError, WorkerPool, check_local, cleanup, run_main
from conveyor import Client, Settings
from conveyor.shared.ids import new_run_id
from conveyor.shared.keys import Keys
from conveyor.shared.models import RunStatus
from conveyor.shared.store import NewRun, RunStore

TRIGGER_BATCH = 500


def _pool_size(client: Client) -> int:
    """Connections the client's redis-py pool holds now (in use or idle)."""
    pool: Any = client.redis.connection_pool
    return len(pool._in_use_connections) + len(pool._available_connections)


async def _last_end_ms(client: Client, run_ids: list[str]) -> int:
    keys = Keys(client.settings.namespace)
    latest = 0
    for start in range(0, len(run_ids), 1000):
        async with client.redis.pipeline(transaction=False) as pipe:
            for run_id in run_ids[start : start + 1000]:
                pipe.hget(keys.run(run_id), "finished_at")
            ends: list[Any] = await pipe.execute()
        latest = max([latest, *(int(e) for e in ends if e)])
    return latest


async def _end_runs(settings: Settings, run_ids: list[str]) -> None:
    """What a worker writes for each run (claim, then finish COMPLETED), 200 at a time."""
    store = RunStore(aioredis.Redis.from_url(settings.redis_url), settings)
    try:
        for start in range(0, len(run_ids), 200):
            chunk = run_ids[start : start + 200]
            claims = await asyncio.gather(*(store.claim(r, "bench", "claim") for r in chunk))
            await asyncio.gather(
                *(
                    store.finish(
                        run_id,
                        "bench",
                        claim.attempt,
                        run_status=RunStatus.COMPLETED,
                        attempt_status="COMPLETED",
                        output=b"null",
                    )
                    for run_id, claim in zip(chunk, claims, strict=True)
                )
            )
    finally:
        await store.close()
        await store.redis.aclose()


def _run_ender(settings: Settings, run_ids: list[str]) -> subprocess.Popen[bytes]:
    """A process that ends the runs (`--end-runs`), so its CPU is not the client's."""
    # This very file, so that an older checkout measured with it (PYTHONPATH) has it too.
    env = {
        **os.environ,
        "CONVEYOR_NAMESPACE": settings.namespace,
        "PYTHONPATH": os.environ.get("PYTHONPATH") or str(ROOT),
    }
    command = [sys.executable, __file__, "--end-runs"]
    proc = subprocess.Popen(command, env=env, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write("\n".join(run_ids).encode())
    proc.stdin.close()
    return proc


async def _delete_keys(settings: Settings) -> None:
    r = aioredis.Redis.from_url(settings.redis_url)
    try:
        keys = [k async for k in r.scan_iter(match=f"{settings.namespace}:*", count=2000)]
        for start in range(0, len(keys), 2000):
            await r.unlink(*keys[start : start + 2000])
    finally:
        await r.aclose()


async def measure(settings: Settings, runs: int, timeout: float, *, broker: bool) -> dict[str, Any]:
    workers = WorkerPool(settings, concurrency=100)
    ender: subprocess.Popen[bytes] | None = None
    try:
        async with Client(settings=settings) as client:
            handles: list[Any] = []
            for start in range(0, runs, TRIGGER_BATCH):
                count = min(TRIGGER_BATCH, runs - start)
                if broker:
                    handles += await noop.batch_trigger([{}] * count)
                else:
                    new = [
                        NewRun(new_run_id(), noop.id, noop.queue, b"{}", [], None, 0)
                        for _ in range(count)
                    ]
                    await client.store.create(new)
                    handles += [client.handle(run.run_id) for run in new]
            cpu = time.process_time()
            waiting = asyncio.ensure_future(
                asyncio.gather(
                    *(h.result(timeout=timeout) for h in handles), return_exceptions=True
                )
            )
            await asyncio.sleep(0.2)  # every wait under way before a run ends
            started = time.time()
            if broker:
                workers.start(1)
            else:
                ender = _run_ender(settings, [h.id for h in handles])
            most = 0
            while not waiting.done():
                most = max(most, _pool_size(client))
                await asyncio.wait([waiting], timeout=0.05)
            done = time.time()
            cpu = time.process_time() - cpu
            outcomes = collections.Counter(
                "ok" if r is None else type(r).__name__ for r in waiting.result()
            )
            last_end = await _last_end_ms(client, [h.id for h in handles]) / 1000
            await workers.stop()
            if ender is not None and ender.wait() != 0:
                raise BenchError(f"the process ending the runs exited with {ender.returncode}")
    finally:
        workers.kill()
        if ender is not None and ender.poll() is None:
            ender.kill()
        if broker:
            await cleanup(settings)
        else:  # nothing in RabbitMQ to delete, and it need not be up
            await _delete_keys(settings)
    return {
        "runs": runs,
        "outcomes": dict(outcomes),
        "worker_start_to_last_result_s": round(done - started, 2),
        "last_end_to_last_result_ms": round((done - last_end) * 1000) if last_end else None,
        "client_cpu_s": round(cpu, 2),
        "client_cpu_per_wait_us": round(cpu / runs * 1e6),
        "most_pool_connections": most,
    }


async def run(args: argparse.Namespace) -> int:
    if args.end_runs:
        await _end_runs(Settings.from_env(), sys.stdin.read().split())
        return 0
    settings = Settings.from_env(namespace=f"bench{secrets.token_hex(4)}")
    check_local(settings.amqp_url, "CONVEYOR_AMQP_URL")
    check_local(settings.redis_url, "CONVEYOR_REDIS_URL")
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
    for runs in args.runs:
        result = await measure(settings, runs, args.timeout, broker=not args.no_broker)
        print(" ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks results", description=__doc__)
    parser.add_argument(
        "--runs",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[10_000],
        help="comma-separated numbers of waits, one measurement each (default 10000)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="of each result() call")
    parser.add_argument(
        "--no-broker", action="store_true", help="runs ended by a script, not a worker"
    )
    parser.add_argument("--end-runs", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("results benchmark", run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
