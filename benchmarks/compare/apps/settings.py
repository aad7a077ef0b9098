"""What a benchmark app reads from the environment the harness gives its processes."""

from __future__ import annotations

import os

import msgspec

CONCURRENCY = 100  # runs at once per worker process where the system runs coroutines
PREFETCH = 100  # unacked messages per worker process, the same for every system
THREADS = 8  # Dramatiq's default worker threads per process
FANOUT_WAIT = 120.0  # seconds a fan-out parent waits at most for its children's results


class AppSettings(msgspec.Struct, frozen=True):
    namespace: str  # prefix of every queue, exchange and Redis key of the run
    amqp_url: str
    redis_url: str
    backend: bool  # keep results in Redis (each system's own result backend)

    @classmethod
    def from_env(cls) -> AppSettings:
        return cls(
            namespace=os.environ["BENCH_NAMESPACE"],
            amqp_url=os.environ["CONVEYOR_AMQP_URL"],
            redis_url=os.environ["CONVEYOR_REDIS_URL"],
            backend=os.environ.get("BENCH_BACKEND") == "1",
        )

    def env(self) -> dict[str, str]:
        return {
            "BENCH_NAMESPACE": self.namespace,
            "CONVEYOR_AMQP_URL": self.amqp_url,
            "CONVEYOR_REDIS_URL": self.redis_url,
            "CONVEYOR_NAMESPACE": self.namespace,
            "BENCH_BACKEND": "1" if self.backend else "0",
        }
