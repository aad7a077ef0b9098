"""Fixtures: the real RabbitMQ and Redis, a fresh namespace per test, worker processes.

Services come from CONVEYOR_AMQP_URL / CONVEYOR_REDIS_URL; where those are unset and a
Docker engine answers, testcontainers starts them; otherwise the session fails with a
message saying how to start them. Nothing is ever skipped for lack of a service.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

# Imported here, at the top of the stack: hypothesis's pytest plugin imports it lazily at
# the end of a session that ran no hypothesis test, deep enough in the stack that
# CPython 3.11.7's parser fails with "AST constructor recursion depth mismatch".
import hypothesis  # noqa: F401
import pytest

from conveyor import Client, Settings
from conveyor.broker.purge import purge_namespace
from conveyor.shared.keys import Keys
from conveyor.shared.redis_client import redis_client
from conveyor.worker import Worker
from tests.servers import OwnRedis

ROOT = Path(__file__).resolve().parent.parent


class Services:
    def __init__(self, amqp_url: str, redis_url: str) -> None:
        self.amqp_url = amqp_url
        self.redis_url = redis_url


def _docker_available() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    amqp = os.environ.get("CONVEYOR_AMQP_URL")
    redis_url = os.environ.get("CONVEYOR_REDIS_URL")
    if amqp and redis_url:
        yield Services(amqp, redis_url)
        return
    if _docker_available():
        from testcontainers.rabbitmq import RabbitMqContainer
        from testcontainers.redis import RedisContainer

        with (
            RabbitMqContainer("rabbitmq:3.13-management") as rabbit,
            RedisContainer("redis:7.2") as red,
        ):
            params = rabbit.get_connection_params()
            amqp = f"amqp://guest:guest@{params.host}:{params.port}/"
            redis_url = f"redis://{red.get_container_host_ip()}:{red.get_exposed_port(6379)}/0"
            yield Services(amqp, redis_url)
        return
    pytest.exit(
        "conveyor's tests need RabbitMQ and Redis: set CONVEYOR_AMQP_URL and CONVEYOR_REDIS_URL "
        "(e.g. amqp://guest:guest@127.0.0.1:5672/ and redis://127.0.0.1:6379/0), or run a "
        "Docker engine so testcontainers can start them. `./dev test` starts local servers.",
        returncode=3,
    )


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    """A redis-server of the test's own (password s3cret), to stop and start at will."""
    server = OwnRedis(password="s3cret")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def namespace() -> str:
    return f"t{secrets.token_hex(5)}"


@pytest.fixture
def settings(services: Services, namespace: str) -> Settings:
    return Settings(
        amqp_url=services.amqp_url,
        redis_url=services.redis_url,
        namespace=namespace,
        lease_ttl=2.0,
        shutdown_grace=5.0,
        publish_timeout=30.0,
    )


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with Client(settings=settings) as c:
        yield c
    await cleanup(settings)


async def cleanup(settings: Settings) -> None:
    """Delete every queue, exchange and key of the namespace, and the trace lists of
    its runs (tests/tasks.py `record()`), which are keyed by run id alone."""
    await _delete_traces(settings)
    # Work queues are named after tasks; delete any the tests may have declared.
    await purge_namespace(settings, await _work_queues(settings))


async def _delete_traces(settings: Settings) -> None:
    from tests.tasks import trace_key

    r = redis_client(settings)
    try:
        pattern = Keys(settings.namespace).run("*")
        run_keys = [k async for k in r.scan_iter(match=pattern, count=1000)]
        traces = [trace_key(k.decode().split("{", 1)[1].rsplit("}", 1)[0]) for k in run_keys]
        for start in range(0, len(traces), 1000):
            await r.delete(*traces[start : start + 1000])
    finally:
        await r.aclose()


async def _work_queues(settings: Settings) -> list[str]:
    from conveyor import registered_tasks
    from tests import tasks as test_tasks  # noqa: F401  (registers the tasks)

    return sorted({t.queue for t in registered_tasks().values()} | {"unrouted"})


@pytest.fixture
async def worker(settings: Settings, client: Client) -> AsyncIterator[Worker]:
    """An in-process worker running every task in tests/tasks.py."""
    from tests import tasks as test_tasks

    w = Worker(test_tasks.ALL, settings=settings, concurrency=20)
    await w.start()
    yield w
    await w.shutdown()


class ConveyorProcess:
    """A real `conveyor` command (worker, scheduler) for fault tests, killed with SIGKILL,
    configured from `settings` and `env`. With `log`, its output goes to that file."""

    def __init__(
        self,
        command: list[str],
        settings: Settings,
        env: dict[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        full_env = dict(os.environ)
        full_env.update(
            CONVEYOR_AMQP_URL=settings.amqp_url,
            CONVEYOR_REDIS_URL=settings.redis_url,
            CONVEYOR_NAMESPACE=settings.namespace,
            CONVEYOR_LEASE_TTL=str(settings.lease_ttl),
            CONVEYOR_SHUTDOWN_GRACE=str(settings.shutdown_grace),
            CONVEYOR_RUN_TTL=str(settings.run_ttl),
            CONVEYOR_DELIVERY_LIMIT=str(settings.delivery_limit),
            PYTHONPATH=str(ROOT),
        )
        full_env.update(env or {})
        self.log_path = log
        output = open(log, "wb") if log is not None else None  # noqa: SIM115 (the child's)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "conveyor", *command],
                env=full_env,
                cwd=str(ROOT),
                stdout=output,
                stderr=output,
            )
        finally:
            if output is not None:
                output.close()

    def output(self) -> str:
        return self.log_path.read_text() if self.log_path is not None else ""

    def cpu_seconds(self) -> float:
        """User and system CPU time the process has used so far, from /proc."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self, sig: int = 9) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)


class WorkerProcess(ConveyorProcess):
    """`conveyor worker tests.tasks [extra...]`."""

    def __init__(
        self,
        settings: Settings,
        *extra: str,
        env: dict[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        super().__init__(["worker", "tests.tasks", *extra], settings, env, log)


@pytest.fixture
def spawn_worker(settings: Settings, client: Client) -> Iterator[Any]:
    # Depends on `client` so that the processes are gone before its cleanup runs: a live
    # worker would re-declare the namespace's topology after the purge.
    procs: list[WorkerProcess] = []

    def spawn(*extra: str, env: dict[str, str] | None = None) -> WorkerProcess:
        p = WorkerProcess(settings, *extra, env=env)
        procs.append(p)
        return p

    yield spawn
    for p in procs:
        p.kill()
        p.wait()


class SchedulerProcess(ConveyorProcess):
    """`conveyor scheduler tests.tasks`, its log in `log_path` for the tests to read."""

    def __init__(self, settings: Settings, log_path: Path, env: dict[str, str]) -> None:
        super().__init__(["scheduler", "tests.tasks"], settings, env, log_path)


# Small enough that the scheduler tests see a takeover and a reap within seconds.
SCHEDULER_ENV = {
    "CONVEYOR_SCHEDULER_LEASE_TTL": "2",
    "CONVEYOR_REAP_AFTER": "1",
    "CONVEYOR_REAP_INTERVAL": "0.3",
}


@pytest.fixture
def spawn_scheduler(settings: Settings, client: Client, tmp_path: Path) -> Iterator[Any]:
    """Starts scheduler processes (killed at the end, before the namespace's cleanup)."""
    procs: list[SchedulerProcess] = []

    def spawn(env: dict[str, str] | None = None) -> SchedulerProcess:
        log = tmp_path / f"scheduler-{len(procs)}.log"
        p = SchedulerProcess(settings, log, {**SCHEDULER_ENV, **(env or {})})
        procs.append(p)
        return p

    yield spawn
    for p in procs:
        p.kill()
        p.wait()


async def eventually(check: Any, timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll an async predicate until it returns a truthy value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")
        await asyncio.sleep(interval)
