"""The soak: three-step runs through worker kills, broker restarts, a Redis crash and a
scheduler leader kill, checked by counting (issue 7 item 11).

    python -m tests.soak [--runs 500] [--seconds 60]

Runs are triggered at a steady rate over the fault period, through the public API, onto
three `conveyor worker` processes and two `conveyor scheduler` processes. Meanwhile: one
worker is SIGKILLed every 5 s and started again; RabbitMQ is restarted twice
(`rabbitmqctl stop_app`/`start_app`, so the shared broker is down a few seconds each
time); the run-state Redis, started here with AOF and `appendfsync everysec`, is SIGKILLed
once and started again from its AOF; the scheduler leader is SIGKILLed once.

Each step appends "step:attempt" to a ledger list of its run, kept on another Redis (the
one CONVEYOR_REDIS_URL names) so that the crash of the run-state Redis cannot hide an
execution. The checker then counts, for the runs whose trigger returned a handle:
lost (no run, or not terminal at the end), runs that executed again after they had
completed, step re-executions (a step in the ledger under more than one attempt), and of
those the ones not explained by a crash of the earlier attempt's worker. It exits 1 unless
nothing is lost, nothing completed twice and every re-execution is explained.

Needs the machine's RabbitMQ (and rabbitmqctl) and a redis-server binary; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis

from conveyor import Client, Retry, Settings, current_run, step, task
from conveyor.shared.errors import TriggerError
from conveyor.shared.keys import Keys

LEDGER_URL = "CONVEYOR_SOAK_LEDGER_URL"
_ledgers: dict[int, aioredis.Redis] = {}


def ledger_key(namespace: str, run_id: str) -> str:
    return f"conveyor-soak:{namespace}:{run_id}"


def _ledger() -> aioredis.Redis:
    loop = id(asyncio.get_running_loop())
    if loop not in _ledgers:
        _ledgers[loop] = aioredis.Redis.from_url(os.environ[LEDGER_URL])
    return _ledgers[loop]


@step()
async def soak_step(name: str) -> str:
    run = current_run()
    namespace = os.environ.get("CONVEYOR_NAMESPACE", "conveyor")
    await _ledger().rpush(ledger_key(namespace, run.id), f"{name}:{run.attempt}")
    await asyncio.sleep(random.uniform(0.05, 0.3))
    return name


@task(id="soak", retry=Retry(max_attempts=5, min_delay=0.2, max_delay=2.0))
async def soak(n: int) -> list[str]:
    return [await soak_step("a"), await soak_step("b"), await soak_step("c")]


# -- the run ----------------------------------------------------------------------------

WORKERS = 3
KILL_EVERY = 5.0
ENV = {
    "CONVEYOR_LEASE_TTL": "3",
    "CONVEYOR_SCHEDULER_LEASE_TTL": "3",
    "CONVEYOR_REAP_AFTER": "10",
    "CONVEYOR_REAP_INTERVAL": "1",
    "CONVEYOR_SHUTDOWN_GRACE": "2",
}


class Report(msgspec.Struct):
    accepted: int = 0
    refused: int = 0
    lost: int = 0
    non_terminal: int = 0
    completed: int = 0
    failed: int = 0
    completed_twice: int = 0
    step_reexecutions: int = 0
    unexplained_reexecutions: int = 0
    worker_kills: int = 0
    broker_restarts: int = 0
    redis_kills: int = 0
    leader_kills: int = 0
    recovery_s: float = 0.0

    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.non_terminal == 0
            and self.completed_twice == 0
            and self.unexplained_reexecutions == 0
        )


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


class Soak:
    def __init__(self, runs: int, seconds: float, workdir: Path) -> None:
        from tests.conftest import WorkerProcess
        from tests.servers import OwnRedis

        self.runs = runs
        self.seconds = seconds
        self.workdir = workdir
        self.redis = OwnRedis(data_dir=workdir, appendfsync="everysec")
        self.namespace = f"soak{secrets.token_hex(4)}"
        self.ledger_url = os.environ.get("CONVEYOR_REDIS_URL", "redis://127.0.0.1:6379/0")
        self.amqp_url = os.environ.get("CONVEYOR_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
        self.settings = Settings(
            amqp_url=self.amqp_url, redis_url=self.redis.url, namespace=self.namespace
        )
        self.env = {**ENV, LEDGER_URL: self.ledger_url}
        self._worker_cls = WorkerProcess
        self.workers: list[Any] = []
        self.schedulers: list[Any] = []
        self.handles: list[str] = []
        self.report = Report()
        self._log = workdir / "logs"
        self._log.mkdir(exist_ok=True)
        self._spawned = 0

    def _spawn_worker(self) -> Any:
        self._spawned += 1
        return self._worker_cls(
            self.settings,
            "tests.soak",
            "--concurrency",
            "10",
            env=self.env,
            log=self._log / f"worker-{self._spawned}.log",
        )

    def _spawn_scheduler(self) -> Any:
        from tests.conftest import SchedulerProcess

        self._spawned += 1
        return SchedulerProcess(
            self.settings, self._log / f"scheduler-{self._spawned}.log", self.env
        )

    async def run(self) -> Report:
        self.redis.start()
        try:
            self.workers = [self._spawn_worker() for _ in range(WORKERS)]
            self.schedulers = [self._spawn_scheduler() for _ in range(2)]
            async with Client(settings=self.settings):
                triggering = asyncio.create_task(self._trigger_all())
                last_fault = await self._faults()
                await triggering
                await self._until_terminal(last_fault)
            await self._check()
        finally:
            for p in [*self.workers, *self.schedulers]:
                p.kill()
                p.wait()
            await self._cleanup()
            self.redis.kill()
        return self.report

    async def _trigger_all(self) -> None:
        """N triggers at a steady rate over the fault period, each in its own task so a
        trigger waiting through an outage does not hold up the next."""
        pending: list[asyncio.Task[None]] = []
        interval = self.seconds * 0.85 / self.runs
        for i in range(self.runs):
            pending.append(asyncio.create_task(self._trigger(i)))
            await asyncio.sleep(interval)
        await asyncio.gather(*pending)

    async def _trigger(self, i: int) -> None:
        try:
            handle = await soak.trigger(i)
        except TriggerError as exc:
            self.report.refused += 1
            print(f"trigger {i} refused: {exc}", file=sys.stderr)
            return
        self.handles.append(handle.id)

    async def _faults(self) -> float:
        """The fault schedule; returns when the last fault ended (monotonic)."""
        start = time.monotonic()
        plan = [
            (0.25, self._restart_broker),
            (0.45, self._crash_redis),
            (0.65, self._restart_broker),
            (0.8, self._kill_leader),
        ]
        next_kill = start + KILL_EVERY
        last = start
        while time.monotonic() - start < self.seconds:
            now = time.monotonic()
            if plan and now - start >= plan[0][0] * self.seconds:
                await plan.pop(0)[1]()
                last = time.monotonic()
            elif now >= next_kill:
                self._kill_a_worker()
                next_kill += KILL_EVERY
                last = time.monotonic()
            await asyncio.sleep(0.1)
        return last

    def _kill_a_worker(self) -> None:
        i = random.randrange(len(self.workers))
        self.workers[i].kill(signal.SIGKILL)
        self.workers[i].wait()
        self.workers[i] = self._spawn_worker()
        self.report.worker_kills += 1

    async def _restart_broker(self) -> None:
        await asyncio.to_thread(rabbitmqctl, "stop_app")
        try:
            await asyncio.sleep(3)
        finally:
            await asyncio.to_thread(rabbitmqctl, "start_app")
            await asyncio.to_thread(rabbitmqctl, "await_startup")
        self.report.broker_restarts += 1

    async def _crash_redis(self) -> None:
        self.redis.kill()
        await asyncio.sleep(2)
        await asyncio.to_thread(self.redis.start)
        self.report.redis_kills += 1

    async def _kill_leader(self) -> None:
        r = aioredis.Redis.from_url(self.redis.url)
        try:
            token = await r.get(Keys(self.namespace).leader)
        finally:
            await r.aclose()
        if token is None:
            print("no scheduler leads at the moment of the leader kill", file=sys.stderr)
            return
        pid = int(token.decode().split(":")[2])
        for i, p in enumerate(self.schedulers):
            if p.proc.pid == pid:
                p.kill(signal.SIGKILL)
                p.wait()
                self.schedulers[i] = self._spawn_scheduler()
                self.report.leader_kills += 1

    async def _until_terminal(self, last_fault: float, timeout: float = 240.0) -> None:
        keys = Keys(self.namespace)
        r = aioredis.Redis.from_url(self.redis.url)
        try:
            while True:
                async with r.pipeline(transaction=False) as pipe:
                    for run_id in self.handles:
                        pipe.hget(keys.run(run_id), "status")
                    statuses = await pipe.execute()
                waiting = sum(1 for s in statuses if s not in _TERMINAL)
                if not waiting or time.monotonic() - last_fault > timeout:
                    self.report.recovery_s = round(time.monotonic() - last_fault, 1)
                    return
                await asyncio.sleep(0.5)
        finally:
            await r.aclose()

    async def _check(self) -> None:
        report = self.report
        report.accepted = len(self.handles)
        ledger = aioredis.Redis.from_url(self.ledger_url)
        async with Client(settings=self.settings) as client:
            try:
                for run_id in self.handles:
                    run = await _get(client, run_id)
                    raw = await ledger.lrange(ledger_key(self.namespace, run_id), 0, -1)
                    entries = [e.decode().split(":") for e in raw]
                    if run is None:
                        report.lost += 1
                        continue
                    if not run.status.is_terminal:
                        report.non_terminal += 1
                        continue
                    if run.status.value == "COMPLETED":
                        report.completed += 1
                        done = run.attempts[-1].number
                        if any(int(attempt) > done for _, attempt in entries):
                            report.completed_twice += 1
                    else:
                        report.failed += 1
                    crashed = {a.number for a in run.attempts if a.status != "COMPLETED"}
                    for stepname, count in Counter(s for s, _ in entries).items():
                        if count > 1:
                            report.step_reexecutions += count - 1
                            attempts = sorted(int(a) for s, a in entries if s == stepname)
                            if not set(attempts[:-1]) <= crashed:
                                report.unexplained_reexecutions += 1
            finally:
                await ledger.aclose()

    async def _cleanup(self) -> None:
        from conveyor import registered_tasks
        from conveyor.broker.purge import purge_namespace
        from tests import tasks as _  # noqa: F401  (registers the tasks the workers ran)

        try:
            # Every queue the workers declared: they run tests.tasks' tasks too.
            await purge_namespace(
                self.settings, sorted({t.queue for t in registered_tasks().values()})
            )
        except Exception as exc:
            print(f"could not purge the soak's namespace: {exc!r}", file=sys.stderr)
        ledger = aioredis.Redis.from_url(self.ledger_url)
        try:
            keys = [k async for k in ledger.scan_iter(f"conveyor-soak:{self.namespace}:*")]
            for start in range(0, len(keys), 1000):
                await ledger.delete(*keys[start : start + 1000])
        finally:
            await ledger.aclose()


_TERMINAL = {b"COMPLETED", b"FAILED", b"CANCELED", b"CRASHED", b"TIMED_OUT", b"EXPIRED"}


async def _get(client: Client, run_id: str) -> Any:
    from conveyor.shared.errors import RunNotFound

    try:
        return await client.get_run(run_id)
    except RunNotFound:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the fault period")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="conveyor-soak-") as tmp:
        report = asyncio.run(Soak(args.runs, args.seconds, Path(tmp)).run())
    for field in report.__struct_fields__:
        print(f"{field.replace('_', ' '):<26} {getattr(report, field)}")
    print(f"{'wall time s':<26} {time.monotonic() - started:.0f}")
    print("OK" if report.ok() else "FAILED")
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
