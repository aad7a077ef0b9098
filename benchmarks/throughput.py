"""conveyor's throughput and latency benchmark (see benchmarks/README.md).

    .venv/bin/python -m benchmarks.throughput [--quick] [--workers 1,2] [--json FILE]

For each number of worker processes (real `python -m conveyor worker benchmarks.tasks`
processes) it measures: the no-op drain rate (runs triggered in bulk before the workers
start, timed from the first run's start to the last run's end), trigger throughput
(concurrent `trigger` calls and `batch_trigger`), trigger-to-start latency at a fixed rate
of 200 runs/s, and the cost of one checkpointed step. A last pass counts the Redis and
AMQP round trips per run. Everything lives in a random namespace that is deleted at the
end; only services on 127.0.0.1 are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aio_pika
import msgspec
import uvloop
from redis.asyncio.cluster import RedisCluster

from benchmarks import counting
from benchmarks.tasks import noop, stamp, steps
from conveyor import Client, Settings
from conveyor._client import RunHandle
from conveyor.broker.topology import Topology
from conveyor.shared.models import TERMINAL
from conveyor.shared.redis_client import Redis, redis_client

ROOT = Path(__file__).resolve().parent.parent
QUEUES = [noop.queue, stamp.queue, steps.queue]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
TERMINAL_BYTES = {s.value.encode() for s in TERMINAL}
STEPS_PER_RUN = 10
# Finished runs whose memory is measured after a drain.
MEMORY_SAMPLE = 500
T = TypeVar("T")


class BenchError(Exception):
    pass


class Sizes(msgspec.Struct, frozen=True):
    drain: int  # no-op runs drained per worker count
    trigger: int  # runs triggered by concurrent trigger() calls
    inflight: int  # trigger() calls in flight at once
    batch: int  # runs triggered by batch_trigger()
    batch_size: int  # runs per batch_trigger() call
    latency_seconds: float  # length of the fixed-rate latency phase
    rate: float  # runs/s of the latency phases
    step_runs: int  # runs of steps(0) and of steps(10) for the in-task step latency
    step_drain: int  # steps(10) runs drained for the per-step throughput cost
    count_runs: int  # no-op runs of the round-trip counting pass


FULL = Sizes(20_000, 5_000, 256, 5_000, 500, 10.0, 200.0, 300, 3_000, 1_000)
QUICK = Sizes(2_000, 1_000, 256, 1_000, 500, 2.0, 200.0, 60, 300, 200)


# -- small helpers -------------------------------------------------------------------------


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def check_local(url: str, what: str) -> None:
    host = urlsplit(url).hostname or ""
    if host not in LOCAL_HOSTS:
        raise BenchError(
            f"{what} points at {host!r}: the benchmark floods the services it uses, so it "
            "only runs against 127.0.0.1 (set CONVEYOR_AMQP_URL / CONVEYOR_REDIS_URL to a "
            "local server)"
        )


# -- worker processes ----------------------------------------------------------------------


class WorkerPool:
    """Real worker processes for the benchmark's tasks; stopped with SIGTERM (graceful)."""

    def __init__(
        self, settings: Settings, concurrency: int, module: str = "benchmarks.tasks"
    ) -> None:
        self.settings = settings
        self.concurrency = concurrency
        self.module = module
        self.procs: list[subprocess.Popen[bytes]] = []
        self.profilers: list[subprocess.Popen[bytes]] = []

    def start(self, count: int, *, env: Mapping[str, str] | None = None) -> None:
        full_env = dict(os.environ)
        full_env.update(
            CONVEYOR_AMQP_URL=self.settings.amqp_url,
            CONVEYOR_REDIS_URL=self.settings.redis_url,
            CONVEYOR_NAMESPACE=self.settings.namespace,
            PYTHONPATH=str(ROOT),
        )
        full_env.update(env or {})
        command = [sys.executable, "-m", "conveyor", "worker", self.module]
        command += ["--concurrency", str(self.concurrency), "--log-level", "ERROR"]
        for _ in range(count):
            self.procs.append(subprocess.Popen(command, env=full_env, cwd=str(ROOT)))

    def profile_first(self, output: str) -> None:
        """Attach py-spy to the first worker; it writes a speedscope file when that exits."""
        spy = Path(sys.executable).with_name("py-spy")
        if not spy.exists():
            raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
        pid = str(self.procs[0].pid)
        command = [str(spy), "record", "--pid", pid, "-o", output, "--format", "speedscope"]
        self.profilers.append(subprocess.Popen([*command, "--rate", "250", "--nonblocking"]))

    async def stop(self, timeout: float = 30.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.procs + self.profilers):
            if time.monotonic() > deadline:
                self.kill()
                raise BenchError(f"worker processes did not stop within {timeout}s of SIGTERM")
            await asyncio.sleep(0.05)
        failed = [p.returncode for p in self.procs if p.returncode not in (0, -signal.SIGTERM)]
        self.procs.clear()
        self.profilers.clear()
        if failed:
            raise BenchError(f"worker processes exited with {failed}; see their output above")

    def kill(self) -> None:
        for proc in self.procs + self.profilers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.procs.clear()
        self.profilers.clear()


# -- the benchmark -------------------------------------------------------------------------


class Bench:
    def __init__(self, settings: Settings, sizes: Sizes, concurrency: int) -> None:
        self.settings = settings
        self.sizes = sizes
        self.pool = WorkerPool(settings, concurrency)
        self.topology = Topology(settings)
        self.client = Client(settings=settings)
        self.redis: Redis = self.client.redis
        self.own_hget = 0  # our own HGET polls, subtracted from the server's command counts
        self.server_pids = _server_pids()
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

    # -- observing ---------------------------------------------------------------------

    async def queue_state(self, queue: str) -> tuple[int, int]:
        """(ready messages, consumers) of a work queue."""
        assert self._channel is not None
        declared = await self._channel.declare_queue(self.topology.names.queue(queue), passive=True)
        result = declared.declaration_result
        return result.message_count or 0, result.consumer_count or 0

    async def wait_consumers(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for queue in QUEUES:
            while (await self.queue_state(queue))[1] < count:
                if time.monotonic() > deadline:
                    raise BenchError(f"{count} worker(s) did not start consuming in {timeout}s")
                await asyncio.sleep(0.05)

    async def wait_done(self, ids: Sequence[str], queue: str, timeout: float) -> None:
        """Wait until every run has ended: first the queue empties (cheap to watch), then
        the remaining runs' statuses are polled."""
        deadline = time.monotonic() + timeout
        while (await self.queue_state(queue))[0] > 0:
            if time.monotonic() > deadline:
                raise BenchError(f"queue {queue!r} did not drain within {timeout:.0f}s")
            await asyncio.sleep(0.05)
        pending = list(ids)
        while pending:
            statuses = await self.fetch(pending, ["status"])
            self.own_hget += len(pending)
            pending = [
                i for i, (s,) in zip(pending, statuses, strict=True) if s not in TERMINAL_BYTES
            ]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{len(pending)} runs did not end within {timeout:.0f}s")
            await asyncio.sleep(0.02)

    async def fetch(self, ids: Sequence[str], fields: list[str]) -> list[list[bytes | None]]:
        rows: list[list[bytes | None]] = []
        for part in chunks(ids, 2000):
            async with self.redis.pipeline(transaction=False) as pipe:
                for run_id in part:
                    if len(fields) == 1:
                        pipe.hget(self.client.store.keys.run(run_id), fields[0])
                    else:
                        pipe.hmget(self.client.store.keys.run(run_id), fields)
                replies = await pipe.execute()
            rows += [[r] if len(fields) == 1 else r for r in replies]
        return rows

    async def commandstats(self) -> dict[str, tuple[int, int]]:
        """Calls and µs per command, summed over the primaries of a cluster."""
        if isinstance(self.redis, RedisCluster):
            per_node = await self.redis.info("commandstats", target_nodes=RedisCluster.PRIMARIES)
            infos: list[dict[str, Any]] = list(per_node.values())
        else:
            infos = [await self.redis.info("commandstats")]
        totals: dict[str, tuple[int, int]] = {}
        for info in infos:
            for key, v in info.items():
                if isinstance(v, dict):
                    calls, usec = totals.get(key.removeprefix("cmdstat_"), (0, 0))
                    totals[key.removeprefix("cmdstat_")] = (
                        calls + int(v["calls"]),
                        usec + int(v["usec"]),
                    )
        return totals

    # -- phases ------------------------------------------------------------------------

    async def batch_trigger(self, task: Any, items: Sequence[Mapping[str, Any]]) -> list[str]:
        ids: list[str] = []
        for part in chunks(items, self.sizes.batch_size):
            ids += [h.id for h in await task.batch_trigger(part)]
        return ids

    async def drain(
        self,
        workers: int,
        task: Any,
        items: Sequence[Mapping[str, Any]],
        profile: str | None,
        env: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Trigger all runs with no worker running, then start the workers (with `env`
        added to their environment) and time them."""
        assert not self.pool.procs, "drain needs the workers stopped"
        started = time.perf_counter()
        ids = await self.batch_trigger(task, items)
        trigger_rate = len(ids) / (time.perf_counter() - started)
        before = await self.commandstats()
        self.own_hget = 0
        self.pool.start(workers, env=env)
        if profile:
            self.pool.profile_first(profile)
        # CPU is counted from the moment every worker consumes (imports and start-up excluded).
        await self.wait_consumers(workers)
        ready_ms = time.time() * 1000
        cpu_before = self.cpu_seconds()
        await self.wait_done(ids, task.queue, timeout=max(60.0, len(ids) / 100))
        cpu_after = self.cpu_seconds()
        after = await self.commandstats()
        await self.pool.stop()
        rows = await self.fetch(ids, ["status", "started_at", "finished_at", "attempt"])
        memory = await self.memory_per_run(ids[:MEMORY_SAMPLE])
        bad = sum(1 for r in rows if r[0] != b"COMPLETED" or r[3] != b"1")
        starts = sorted(int(float(r[1] or 0)) for r in rows)
        ends = sorted(int(float(r[2] or 0)) for r in rows)
        n = len(ids)
        span_ms = max(ends[-1] - starts[0], 1)
        lo, hi = n // 10, n * 9 // 10
        steady_ms = ends[hi] - ends[lo]
        after_ready = max(1, sum(1 for end in ends if end > ready_ms))
        return {
            "runs": n,
            "not_completed_first_time": bad,
            "batch_trigger_runs_per_s_no_consumers": trigger_rate,
            "runs_per_s": n * 1000 / span_ms,
            "runs_per_s_steady_10_90": (hi - lo) * 1000 / steady_ms if steady_ms > 0 else None,
            "cpu_us_per_run": {
                name: (cpu_after[name] - cpu_before[name]) * 1e6 / after_ready
                for name in cpu_before
            },
            "redis_server_per_run": self._per_run(before, after, n),
            "redis_bytes_per_finished_run": memory,
        }

    async def memory_per_run(self, ids: Sequence[str]) -> float:
        """Redis's MEMORY USAGE of a finished run's own keys, averaged (the indexes,
        whose entries leave with the runs, are not counted)."""
        keys = self.client.store.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id in ids:
                for key in (keys.run(run_id), keys.steps(run_id), keys.logs(run_id)):
                    pipe.memory_usage(key, samples=0)
            usage = await pipe.execute()
        return sum(u or 0 for u in usage) / max(len(ids), 1)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far by the workers, the Redis server and the RabbitMQ node
        (the servers' figures include every other client's load)."""
        return {
            "workers": sum(_cpu_seconds(p.pid) for p in self.pool.procs),
            "redis": sum(_cpu_seconds(pid) for pid in self.server_pids["redis"]),
            "rabbitmq": sum(_cpu_seconds(pid) for pid in self.server_pids["rabbitmq"]),
        }

    def _per_run(
        self, before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], n: int
    ) -> dict[str, dict[str, float]]:
        """Server-side command counts per run (includes commands inside Lua scripts and any
        other client's traffic in the same period)."""
        out: dict[str, dict[str, float]] = {}
        for cmd, (calls, usec) in after.items():
            c0, u0 = before.get(cmd, (0, 0))
            calls -= c0
            usec -= u0
            if cmd == "hget":
                calls -= self.own_hget
            if cmd in ("info", "exec", "multi") or calls / n < 0.01:
                continue
            out[cmd] = {"calls": calls / n, "usec": usec / n}
        return out

    async def trigger_throughput(self) -> dict[str, Any]:
        """trigger() with many calls in flight, then batch_trigger(), while workers consume."""
        ids: list[str] = []
        remaining = self.sizes.trigger

        async def lane() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                handle = await noop.trigger()
                ids.append(handle.id)

        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(self.sizes.inflight)))
        concurrent_rate = len(ids) / (time.perf_counter() - started)
        started = time.perf_counter()
        batch_ids = await self.batch_trigger(noop, [{}] * self.sizes.batch)
        batch_rate = len(batch_ids) / (time.perf_counter() - started)
        await self.wait_done(ids + batch_ids, noop.queue, timeout=120.0)
        return {
            "trigger_concurrent_runs_per_s": concurrent_rate,
            "batch_trigger_runs_per_s": batch_rate,
        }

    async def paced(
        self, count: int, rate: float, make: Callable[[int], Awaitable[RunHandle[Any]]]
    ) -> list[tuple[str, float, float]]:
        """Start `count` triggers at a fixed rate, each in its own task, whatever the
        previous ones are doing (an open loop); returns (run id, call start, call end)."""

        async def one(i: int) -> tuple[str, float, float]:
            began = time.time()
            handle = await make(i)
            return handle.id, began, time.time()

        loop = asyncio.get_running_loop()
        origin = loop.time() + 0.05
        pending: list[asyncio.Task[tuple[str, float, float]]] = []
        for i in range(count):
            wait = origin + i / rate - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            pending.append(asyncio.create_task(one(i)))
        return await asyncio.gather(*pending)

    async def latency(self) -> dict[str, Any]:
        """Trigger-to-start at a fixed rate: the task returns time.time() as it starts."""
        count = int(self.sizes.rate * self.sizes.latency_seconds)
        calls = await self.paced(count, self.sizes.rate, lambda _: stamp.trigger())
        ids = [c[0] for c in calls]
        await self.wait_done(ids, stamp.queue, timeout=60.0)
        outputs = await self.fetch(ids, ["output"])
        to_start = [
            (float(out[0] or b"nan") - began) * 1000
            for (_, began, _), out in zip(calls, outputs, strict=True)
        ]
        call = [(end - began) * 1000 for _, began, end in calls]
        return {
            "rate": self.sizes.rate,
            "runs": count,
            "trigger_to_start_ms": {"p50": pct(to_start, 50), "p99": pct(to_start, 99)},
            "trigger_call_ms": {"p50": pct(call, 50), "p99": pct(call, 99)},
        }

    async def step_latency(self) -> dict[str, Any]:
        """steps(0) and steps(10) interleaved at a modest rate; each run reports the time
        its steps took inside the task."""
        count = 2 * self.sizes.step_runs

        def make(i: int) -> Awaitable[RunHandle[float]]:
            return steps.trigger(n=STEPS_PER_RUN if i % 2 else 0)

        calls = await self.paced(count, self.sizes.rate / 2, make)
        ids = [c[0] for c in calls]
        await self.wait_done(ids, steps.queue, timeout=60.0)
        outputs = [float(o[0] or b"nan") * 1000 for o in await self.fetch(ids, ["output"])]
        zero, ten = outputs[0::2], outputs[1::2]
        return {
            "in_task_ms_per_step": {
                "p50": (statistics.median(ten) - statistics.median(zero)) / STEPS_PER_RUN,
                "p99": pct(ten, 99) / STEPS_PER_RUN,
            },
        }

    async def scenario(self, workers: int, profile: str | None) -> dict[str, Any]:
        print(f"\n== {workers} worker process(es)", flush=True)
        result: dict[str, Any] = {}
        print("  draining no-op runs ...", flush=True)
        result["noop_drain"] = await self.drain(workers, noop, [{}] * self.sizes.drain, profile)
        print(f"    {result['noop_drain']['runs_per_s']:,.0f} runs/s", flush=True)
        print(f"  draining steps({STEPS_PER_RUN}) runs ...", flush=True)
        items = [{"n": STEPS_PER_RUN}] * self.sizes.step_drain
        result["steps_drain"] = await self.drain(workers, steps, items, None)
        print(f"    {result['steps_drain']['runs_per_s']:,.0f} runs/s", flush=True)
        self.pool.start(workers)
        await self.wait_consumers(workers)
        print("  trigger throughput ...", flush=True)
        result["trigger"] = await self.trigger_throughput()
        print(f"  latency at {self.sizes.rate:.0f} runs/s ...", flush=True)
        result["latency"] = await self.latency()
        print("  step latency ...", flush=True)
        result["steps"] = await self.step_latency()
        await self.pool.stop()
        r0 = result["noop_drain"]["runs_per_s"]
        r10 = result["steps_drain"]["runs_per_s"]
        # Extra process-milliseconds a step adds to a run when the workers are saturated.
        result["steps"]["drain_ms_per_step_per_process"] = (
            (1 / r10 - 1 / r0) * 1000 * workers / STEPS_PER_RUN
        )
        return result

    async def count_round_trips(self) -> dict[str, Any]:
        """Count the round trips of the trigger calls here and of one counting worker."""
        n = self.sizes.count_runs
        counting.install()
        counting.reset()
        remaining = n
        ids: list[str] = []

        async def lane() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                ids.append((await noop.trigger()).id)

        await asyncio.gather(*(lane() for _ in range(50)))
        per_trigger = _divide(counting.snapshot(), n)
        counting.reset()
        ids += [h.id for h in await noop.batch_trigger([{}] * n)]
        per_batch_run = _divide(counting.snapshot(), n)
        noop_worker = await self._counted_worker(ids, noop.queue)
        step_ids = await self.batch_trigger(steps, [{"n": STEPS_PER_RUN}] * (n // 2))
        steps_worker = await self._counted_worker(step_ids, steps.queue)
        per_step = {
            k: (steps_worker.get(k, 0) - noop_worker.get(k, 0)) / STEPS_PER_RUN
            for k in steps_worker.keys() | noop_worker.keys()
        }
        return {
            "trigger": per_trigger,
            "batch_trigger": per_batch_run,
            "worker_noop_run": noop_worker,
            "worker_per_step": {k: v for k, v in per_step.items() if abs(v) >= 0.005},
        }

    async def _counted_worker(self, ids: Sequence[str], queue: str) -> dict[str, float]:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "counts.json")
            self.pool.start(1, env={"CONVEYOR_BENCH_COUNT": path})
            await self.wait_done(ids, queue, timeout=120.0)
            await self.pool.stop()
            raw: dict[str, int] = _read_json(path)
        # Declarations, consumer set-up and Redis CONFIG happen once per process.
        per_run = {
            k: v
            for k, v in raw.items()
            if not k.startswith("amqp rpc") and not k.startswith("redis CONFIG")
        }
        return _divide(per_run, len(ids))


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (0 where it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_pids() -> dict[str, list[int]]:
    """The local redis-server and RabbitMQ node processes (Linux /proc; empty elsewhere)."""
    found: dict[str, list[int]] = {"redis": [], "rabbitmq": []}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if cmdline.startswith(b"redis-server"):
            found["redis"].append(int(entry.name))
        elif b"beam.smp" in cmdline and b"rabbit boot" in cmdline:
            found["rabbitmq"].append(int(entry.name))
    return found


def _read_json(path: str) -> Any:
    return json.loads(Path(path).read_text())


def _write_json(path: str, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2))


def _divide(counts: Mapping[str, int | float], n: int) -> dict[str, float]:
    return {k: v / n for k, v in sorted(counts.items()) if v}


async def cleanup(settings: Settings, queues: Sequence[str] = QUEUES) -> None:
    """Delete every queue, exchange and key of the benchmark's namespace; a failure on
    one service does not keep the other from being cleaned."""
    try:
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            await Topology(settings).delete(await connection.channel(), list(queues))
    except Exception as exc:
        print(
            f"benchmark: could not delete the RabbitMQ queues and exchanges of namespace "
            f"{settings.namespace!r} ({exc!r}); delete those named {settings.namespace}.*",
            file=sys.stderr,
        )
    r = redis_client(settings)
    try:
        pattern = f"{settings.namespace}:*"
        batch: list[Any] = []
        async for key in r.scan_iter(match=pattern, count=2000):
            batch.append(key)
            if len(batch) >= 2000:
                await r.unlink(*batch)
                batch = []
        if batch:
            await r.unlink(*batch)
    finally:
        await r.aclose()


# -- report --------------------------------------------------------------------------------


def round_trips(counts: Mapping[str, float]) -> tuple[float, float]:
    """(Redis round trips, AMQP round trips) in a counts dict."""
    redis_rt = sum(
        v for k, v in counts.items() if k.startswith("redis ") and "in-pipeline" not in k
    )
    amqp_rt = sum(
        v for k, v in counts.items() if k in ("amqp publish",) or k.startswith("amqp rpc")
    )
    return redis_rt, amqp_rt


def report(results: Mapping[int, Mapping[str, Any]], counts: Mapping[str, Any] | None) -> str:
    ks = sorted(results)
    head = f"{'':52}" + "".join(f"{f'{k} worker' + ('s' if k > 1 else ''):>14}" for k in ks)
    lines = ["", head]

    def row(label: str, get: Callable[[Mapping[str, Any]], float | None], fmt: str) -> None:
        cells = []
        for k in ks:
            value = get(results[k])
            cells.append(f"{'-' if value is None else format(value, fmt):>14}")
        lines.append(f"{label:52}" + "".join(cells))

    row(
        "no-op drain, runs/s (first start..last end)",
        lambda r: r["noop_drain"]["runs_per_s"],
        ",.0f",
    )
    row(
        "no-op drain, runs/s (steady, 10%..90% of ends)",
        lambda r: r["noop_drain"]["runs_per_s_steady_10_90"],
        ",.0f",
    )
    row(
        "no-op drain, worker CPU us/run (all workers)",
        lambda r: r["noop_drain"]["cpu_us_per_run"]["workers"],
        ",.0f",
    )
    row(
        "no-op drain, Redis server CPU us/run (noisy)",
        lambda r: r["noop_drain"]["cpu_us_per_run"]["redis"],
        ",.0f",
    )
    row(
        "no-op drain, RabbitMQ CPU us/run (noisy)",
        lambda r: r["noop_drain"]["cpu_us_per_run"]["rabbitmq"],
        ",.0f",
    )
    row(f"steps({STEPS_PER_RUN}) drain, runs/s", lambda r: r["steps_drain"]["runs_per_s"], ",.0f")
    row(
        "trigger(), concurrent calls, runs/s",
        lambda r: r["trigger"]["trigger_concurrent_runs_per_s"],
        ",.0f",
    )
    row(
        "batch_trigger(), runs/s (workers consuming)",
        lambda r: r["trigger"]["batch_trigger_runs_per_s"],
        ",.0f",
    )
    row(
        "batch_trigger(), runs/s (no consumers)",
        lambda r: r["noop_drain"]["batch_trigger_runs_per_s_no_consumers"],
        ",.0f",
    )
    row(
        "trigger-to-start at 200/s, p50 ms",
        lambda r: r["latency"]["trigger_to_start_ms"]["p50"],
        ".2f",
    )
    row(
        "trigger-to-start at 200/s, p99 ms",
        lambda r: r["latency"]["trigger_to_start_ms"]["p99"],
        ".2f",
    )
    row("trigger() call at 200/s, p50 ms", lambda r: r["latency"]["trigger_call_ms"]["p50"], ".2f")
    row("trigger() call at 200/s, p99 ms", lambda r: r["latency"]["trigger_call_ms"]["p99"], ".2f")
    row(
        "Redis bytes per finished no-op run (MEMORY USAGE)",
        lambda r: r["noop_drain"].get("redis_bytes_per_finished_run"),
        ",.0f",
    )
    row(
        "Redis bytes per finished steps(10) run",
        lambda r: r["steps_drain"].get("redis_bytes_per_finished_run"),
        ",.0f",
    )
    row(
        "checkpointed step, in task, p50 ms",
        lambda r: r["steps"]["in_task_ms_per_step"]["p50"],
        ".3f",
    )
    row(
        "checkpointed step, in task, p99 ms",
        lambda r: r["steps"]["in_task_ms_per_step"]["p99"],
        ".3f",
    )
    row(
        "checkpointed step, drain cost, process-ms",
        lambda r: r["steps"]["drain_ms_per_step_per_process"],
        ".3f",
    )
    bad = sum(
        r["noop_drain"]["not_completed_first_time"] + r["steps_drain"]["not_completed_first_time"]
        for r in results.values()
    )
    if bad:
        lines.append(f"WARNING: {bad} drained runs did not complete on their first attempt")

    lines += [
        "",
        "Redis server commands per no-op run during the drain (INFO commandstats deltas;",
        "includes commands inside Lua scripts and other clients' traffic):",
    ]
    for k in ks:
        per = results[k]["noop_drain"]["redis_server_per_run"]
        cells = ", ".join(
            f"{cmd} {v['calls']:.2f} ({v['usec']:.0f} us)" for cmd, v in sorted(per.items())
        )
        lines.append(f"  {k} worker(s): {cells}")

    if counts:
        lines += ["", "Round trips per run, counted in the client and in one worker process:"]
        for label, key in (
            ("trigger()", "trigger"),
            ("batch_trigger(), per run", "batch_trigger"),
            ("worker, per no-op run", "worker_noop_run"),
            ("worker, per checkpointed step", "worker_per_step"),
        ):
            c = counts[key]
            redis_rt, amqp_rt = round_trips(c)
            detail = ", ".join(f"{name} {v:.2f}" for name, v in sorted(c.items()))
            lines.append(f"  {label:30} Redis {redis_rt:.2f}, AMQP {amqp_rt:.2f}  [{detail}]")
    return "\n".join(lines)


# -- entry point ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    parser.add_argument("--workers", default="1,2", help="worker process counts (default 1,2)")
    parser.add_argument("--concurrency", type=int, default=100, help="per worker (default 100)")
    parser.add_argument("--no-count", action="store_true", help="skip the round-trip counting pass")
    parser.add_argument(
        "--profile", metavar="FILE", help="py-spy speedscope profile of the one-worker no-op drain"
    )
    parser.add_argument(
        "--redis-cluster",
        action="store_true",
        help="run on a local Redis Cluster (three primaries, a replica each) that the "
        "benchmark starts from redis-server on free ports, instead of CONVEYOR_REDIS_URL",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--timeout", type=float, default=None, help="give up after this many seconds"
    )
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    if not args.redis_cluster:
        return await _run(args, Settings.from_env(namespace=f"bench{secrets.token_hex(4)}"))
    from tests.servers import RedisClusterGroup

    with tempfile.TemporaryDirectory(prefix="conveyor-bench-cluster-") as directory:
        cluster = await asyncio.to_thread(RedisClusterGroup, Path(directory))
        try:
            print(f"Redis Cluster of 3 primaries and 3 replicas at {cluster.url}", flush=True)
            settings = Settings.from_env(
                namespace=f"bench{secrets.token_hex(4)}", redis_url=cluster.url
            )
            return await _run(args, settings)
        finally:
            cluster.close()


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    check_local(settings.amqp_url, "CONVEYOR_AMQP_URL")
    check_local(settings.redis_url, "CONVEYOR_REDIS_URL")
    sizes = QUICK if args.quick else FULL
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if not workers or min(workers) < 1 or max(workers) > 8:
        raise BenchError("--workers takes 1 to 8 processes, e.g. 1,2")
    timeout = args.timeout or (240.0 if args.quick else 1200.0)
    print(
        f"conveyor benchmark: namespace {settings.namespace}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} (other processes on the machine add noise)",
        flush=True,
    )
    bench = Bench(settings, sizes, args.concurrency)
    # SIGTERM stops the run like Ctrl-C does: the finally below still cleans up.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    results: dict[int, dict[str, Any]] = {}
    counts: dict[str, Any] | None = None
    try:
        async with asyncio.timeout(timeout):
            await bench.open()
            for k in workers:
                results[k] = await bench.scenario(k, args.profile if k == min(workers) else None)
            if not args.no_count:
                print("\n== counting round trips ...", flush=True)
                counts = await bench.count_round_trips()
    finally:
        try:
            await bench.close()
        finally:
            await cleanup(settings)
    print(report(results, counts))
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        _write_json(args.json, {"results": results, "round_trips": counts})
    return 0


def run_main(
    name: str, main: Coroutine[Any, Any, int], errors: tuple[type[Exception], ...] = ()
) -> int:
    """Run a benchmark's main coroutine on uvloop; its expected failures become a
    one-line message and exit status 1, Ctrl-C or SIGTERM status 130."""
    try:
        return uvloop.run(main)
    except (BenchError, *errors) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"{name}: gave up after --timeout seconds", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"{name}: interrupted; its namespace was cleaned up", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("benchmark", run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
