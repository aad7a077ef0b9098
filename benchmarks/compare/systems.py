"""One adapter per system: how to start its workers and how to enqueue its tasks.

The harness imports a system's app module in its own process to enqueue (after setting
the environment the app reads), and starts the system's own worker command for the
workers. Celery and Dramatiq publish synchronously, so the harness calls them from a pool
of ENQUEUE_THREADS threads; taskiq and conveyor are asyncio clients and get ENQUEUE_LANES
concurrent calls.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import msgspec

from .apps.settings import CONCURRENCY, PREFETCH, THREADS, AppSettings

ENQUEUE_THREADS = 8
ENQUEUE_LANES = 256
BATCH = 500  # runs per conveyor batch_trigger() call


class System:
    """The common shape; each subclass fills in its worker command and its enqueue calls."""

    name: str = ""
    queue_type: str = ""
    app_module: str = ""
    has_backend: bool = True  # has a result backend that can be switched on
    fills: tuple[str, ...] = ("threads",)

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self.app: ModuleType | None = None

    # -- lifecycle in the harness process ------------------------------------------------

    async def open(self) -> None:
        os.environ.update(self.settings.env())
        self.app = importlib.import_module(self.app_module)

    async def close(self) -> None:
        pass

    def queues(self) -> list[str]:
        """Every queue the system declares in the run's namespace (deleted at the end)."""
        return []

    def exchanges(self) -> list[str]:
        return []

    # -- workers -------------------------------------------------------------------------

    def worker_commands(self, processes: int, backend: bool) -> list[list[str]]:
        raise NotImplementedError

    def worker_env(self, backend: bool) -> dict[str, str]:
        return msgspec.structs.replace(self.settings, backend=backend).env()

    # -- enqueueing ----------------------------------------------------------------------

    async def enqueue_noops(self, count: int, fill: str) -> None:
        raise NotImplementedError

    async def enqueue_chains(self, count: int) -> None:
        raise NotImplementedError

    async def send_stamp(self) -> None:
        """Enqueue one noop whose tag is the moment this call started."""
        raise NotImplementedError

    async def send_fanout(self, count: int) -> None:
        """Enqueue one fan-out parent of `count` children."""
        raise NotImplementedError

    def _module(self) -> Any:
        assert self.app is not None, "open() first"
        return self.app


class ThreadedSystem(System):
    """A peer whose client publishes synchronously (Celery, Dramatiq)."""

    def __init__(self, settings: AppSettings) -> None:
        super().__init__(settings)
        self.pool = ThreadPoolExecutor(ENQUEUE_THREADS, thread_name_prefix=f"{self.name}-enqueue")

    async def close(self) -> None:
        self.pool.shutdown(wait=True)

    def send(self, actor: Any, *args: Any) -> None:
        raise NotImplementedError

    async def enqueue_noops(self, count: int, fill: str) -> None:
        await self._spread(count, lambda: self.send(self._module().noop, 0.0))

    async def enqueue_chains(self, count: int) -> None:
        await self._spread(count, lambda: self.send(self._module().first))

    async def send_stamp(self) -> None:
        noop = self._module().noop
        await asyncio.get_running_loop().run_in_executor(
            self.pool, lambda: self.send(noop, time.time())
        )

    async def send_fanout(self, count: int) -> None:
        fanout = self._module().fanout
        await asyncio.get_running_loop().run_in_executor(
            self.pool, lambda: self.send(fanout, count)
        )

    async def _spread(self, count: int, call: Callable[[], None]) -> None:
        """`count` calls spread over the threads, each thread calling one at a time."""
        share, extra = divmod(count, ENQUEUE_THREADS)

        def run(n: int) -> None:
            for _ in range(n):
                call()

        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(
                loop.run_in_executor(self.pool, run, share + (1 if i < extra else 0))
                for i in range(ENQUEUE_THREADS)
            )
        )


class CelerySystem(ThreadedSystem):
    name = "celery"
    queue_type = "quorum"
    app_module = "benchmarks.compare.apps.celery_app"

    def queues(self) -> list[str]:
        return [self._queue()]

    def exchanges(self) -> list[str]:
        return [self._queue()]

    def _queue(self) -> str:
        return f"{self.settings.namespace}.celery"

    def worker_commands(self, processes: int, backend: bool) -> list[list[str]]:
        return [
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                self.app_module,
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                str(processes),
                "--loglevel",
                "ERROR",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--queues",
                self._queue(),
            ]
        ]

    def send(self, actor: Any, *args: Any) -> None:
        actor.apply_async(args)


class DramatiqSystem(ThreadedSystem):
    name = "dramatiq"
    queue_type = "classic"
    app_module = "benchmarks.compare.apps.dramatiq_app"

    def _queue(self) -> str:
        return f"{self.settings.namespace}.dramatiq"

    def queues(self) -> list[str]:
        q = self._queue()
        return [q, f"{q}.DQ", f"{q}.XQ"]

    def worker_commands(self, processes: int, backend: bool) -> list[list[str]]:
        return [
            [
                sys.executable,
                "-m",
                "dramatiq",
                self.app_module,
                "--processes",
                str(processes),
                "--threads",
                str(THREADS),
                "--queues",
                self._queue(),
            ]
        ]

    def worker_env(self, backend: bool) -> dict[str, str]:
        # one consumer per worker process; Dramatiq's default would be 2 x threads
        return {**super().worker_env(backend), "dramatiq_queue_prefetch": str(PREFETCH)}

    def send(self, actor: Any, *args: Any) -> None:
        actor.send(*args)


class AsyncSystem(System):
    """A system with an asyncio client: calls run in ENQUEUE_LANES concurrent lanes."""

    async def _lanes(self, count: int, call: Callable[[], Awaitable[Any]]) -> None:
        remaining = count

        async def lane() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await call()

        await asyncio.gather(*(lane() for _ in range(min(ENQUEUE_LANES, count))))


class TaskiqSystem(AsyncSystem):
    name = "taskiq"
    queue_type = "quorum"
    app_module = "benchmarks.compare.apps.taskiq_app"
    fills = ("lanes",)

    def _queue(self) -> str:
        return f"{self.settings.namespace}.taskiq"

    def queues(self) -> list[str]:
        return [self._queue(), f"{self._queue()}.dead"]

    def exchanges(self) -> list[str]:
        return [self._queue()]

    async def open(self) -> None:
        await super().open()
        await self._module().broker.startup()

    async def close(self) -> None:
        if self.app is not None:
            await self._module().broker.shutdown()

    def worker_commands(self, processes: int, backend: bool) -> list[list[str]]:
        return [
            [
                sys.executable,
                "-m",
                "taskiq",
                "worker",
                f"{self.app_module}:broker",
                "--workers",
                str(processes),
                "--max-async-tasks",
                str(CONCURRENCY),
                "--ack-type",
                "when_saved" if backend else "when_executed",
                "--log-level",
                "ERROR",
                "--no-configure-logging",
            ]
        ]

    async def enqueue_noops(self, count: int, fill: str) -> None:
        noop = self._module().noop
        await self._lanes(count, lambda: noop.kiq(0.0))

    async def enqueue_chains(self, count: int) -> None:
        first = self._module().first
        await self._lanes(count, first.kiq)

    async def send_stamp(self) -> None:
        await self._module().noop.kiq(time.time())

    async def send_fanout(self, count: int) -> None:
        await self._module().fanout.kiq(count)


class ConveyorSystem(AsyncSystem):
    name = "conveyor"
    queue_type = "quorum"
    app_module = "benchmarks.compare.apps.conveyor_app"
    has_backend = False  # run state and results are always in Redis
    fills = ("batch_trigger", "trigger")

    async def open(self) -> None:
        from conveyor import Client, Settings

        await super().open()
        self.client = Client(settings=Settings.from_env())
        await self.client.__aenter__()  # Task.trigger goes through this client
        await self.client.connect()
        for queue in self.queues():
            await self.client.publisher.ensure_queue(queue)

    async def close(self) -> None:
        if hasattr(self, "client"):  # open() may have failed before the client existed
            await self.client.__aexit__(None, None, None)

    def queues(self) -> list[str]:
        return ["cmp-noop", "cmp-chain", "cmp-fanout", "cmp-fanout-child"]

    def worker_commands(self, processes: int, backend: bool) -> list[list[str]]:
        command = [sys.executable, "-m", "conveyor", "worker", self.app_module]
        command += ["--concurrency", str(CONCURRENCY), "--log-level", "ERROR"]
        return [command] * processes

    async def enqueue_noops(self, count: int, fill: str) -> None:
        noop = self._module().noop
        if fill == "batch_trigger":
            for size in _batches(count):
                await noop.batch_trigger([{"tag": 0.0}] * size)
        else:
            await self._lanes(count, lambda: noop.trigger(0.0))

    async def enqueue_chains(self, count: int) -> None:
        for size in _batches(count):
            await self._module().chain.batch_trigger([{}] * size)

    async def send_stamp(self) -> None:
        await self._module().noop.trigger(time.time())

    async def send_fanout(self, count: int) -> None:
        await self._module().fanout.trigger(count)


def _batches(count: int) -> Iterator[int]:
    for start in range(0, count, BATCH):
        yield min(BATCH, count - start)


SYSTEMS: dict[str, type[System]] = {
    s.name: s for s in (ConveyorSystem, CelerySystem, DramatiqSystem, TaskiqSystem)
}
