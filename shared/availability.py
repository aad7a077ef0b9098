"""Telling an unavailable service from a bad message, and waiting for it to come back.

An error from Redis or RabbitMQ being down, restarting, loading, read-only or failing over
says nothing about the message being handled. A worker that requeued the message at once
would spin, and on RabbitMQ 3.10 to 4.2 every requeue counts towards the queue's
delivery limit, so a short outage would dead-letter a whole backlog. Instead the work
waits at a Gate: the first caller to fail closes it, one prober looks for the service with
exponential backoff and full jitter, and everyone waiting retries once it answers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiormq.exceptions
from redis.exceptions import ClusterError, RedisClusterException, ResponseError, SlotNotCoveredError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import PublishFailed, ServiceUnavailable, describe

log = logging.getLogger("conveyor")

T = TypeVar("T")

# Error replies of a Redis that cannot serve now but will: loading its data, a replica
# (failover under way), a script running too long, a cluster resharding or down, a
# primary without enough replicas, out of memory under noeviction.
_REDIS_TRANSIENT = (
    "LOADING",
    "READONLY",
    "BUSY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOREPLICAS",
    "OOM",
)

# AMQP errors that are about the broker or the connection, not the message: a refused or
# lost connection, a channel closed under us. Refused declarations (arguments that do not
# match, access refused) are configuration errors and are not among them.
_AMQP_TRANSIENT = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ConnectionClosed,
    aiormq.exceptions.ChannelClosed,
    ConnectionError,
)
_AMQP_CONFIGURATION = (
    aiormq.exceptions.AuthenticationError,
    aiormq.exceptions.ChannelPreconditionFailed,
    aiormq.exceptions.ChannelAccessRefused,
    aiormq.exceptions.ChannelNotFoundEntity,
)


def is_redis_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | TimeoutError | OSError):
        return True
    # A cluster whose slots are not all served (a failover under way), its client's
    # redirections exhausted meanwhile, or no node of it reachable.
    if isinstance(exc, ClusterError | SlotNotCoveredError):
        return True
    if isinstance(exc, RedisClusterException) and "cannot be connected" in str(exc):
        return True
    if isinstance(exc, ResponseError):
        # redis-py strips the code of the errors it knows from the message into
        # `status_code` (READONLY, LOADING, ...); BUSY and NOREPLICAS keep it in the text.
        code = getattr(exc, "status_code", None) or str(exc).split(" ", 1)[0]
        return code in _REDIS_TRANSIENT
    return False


def is_broker_unavailable(exc: BaseException) -> bool:
    # aiormq's errors are ConnectionErrors, refused declarations and logins included.
    if isinstance(exc, _AMQP_CONFIGURATION):
        return False
    if isinstance(exc, PublishFailed):
        return exc.unknown
    return isinstance(exc, _AMQP_TRANSIENT)


class Backoff:
    """Exponential backoff with full jitter: each pause is a random part of a ceiling that
    doubles from `first` up to `cap`, so that many waiters do not retry in step."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first = first
        self.cap = cap
        self.failures = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.first * 2**self.failures)
        self.failures += 1
        return max(self.first / 2, random.uniform(0, ceiling))

    def reset(self) -> None:
        self.failures = 0


class Gate:
    """One service as its users see it: open, or closed while it is unavailable.

    `call(op)` runs `op`; when it fails because the service is unavailable, the gate
    closes and the call waits for it to open again, then runs `op` again. So `op` must be
    safe to repeat (every hot-path Redis script is, for the caller that made it). A wait
    ends with ServiceUnavailable when `stopping` is set or after `hold_for` seconds, so
    nothing waits without a bound."""

    def __init__(
        self,
        service: str,
        *,
        unavailable: Callable[[BaseException], bool],
        stopping: asyncio.Event,
        hold_for: float,
        probe: Callable[[], Awaitable[object]] | None = None,
        probe_timeout: float = 5.0,
    ) -> None:
        self.service = service
        self.unavailable = unavailable
        self.stopping = stopping
        self.hold_for = hold_for
        self.probe = probe
        self.probe_timeout = probe_timeout
        self._open = asyncio.Event()
        self._open.set()
        self._since = 0.0
        # Kept across closings until a call succeeds: without a probe, the callers' own
        # retries are what finds the service back, and they must not come ever faster.
        self._backoff = Backoff()
        self._prober: asyncio.Task[None] | None = None

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    async def call(self, op: Callable[[], Awaitable[T]]) -> T:
        deadline: float | None = None
        while True:
            if not self._open.is_set():
                if deadline is None:
                    deadline = time.monotonic() + self.hold_for
                await self.wait(deadline)
            try:
                result = await op()
            except Exception as exc:
                if not self.unavailable(exc):
                    raise
                self.close(exc)
                continue
            if deadline is not None:
                self._backoff.reset()
            return result

    async def wait(self, deadline: float) -> None:
        """Until the gate is open; ServiceUnavailable when stopping or past `deadline`."""
        opened = asyncio.ensure_future(self._open.wait())
        stopping = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait(
                [opened, stopping],
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            opened.cancel()
            stopping.cancel()
        if self._open.is_set():
            return
        if self.stopping.is_set():
            raise ServiceUnavailable(f"{self.service} is unavailable and the worker is stopping")
        raise ServiceUnavailable(
            f"{self.service} has been unavailable for {self.hold_for:.0f}s; giving the work back"
        )

    def close(self, exc: BaseException) -> None:
        if not self._open.is_set():
            return
        self._open.clear()
        self._since = time.monotonic()
        log.warning(
            "%s is unavailable (%s); holding work and retrying with backoff",
            self.service,
            describe(exc),
        )
        self._prober = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        while not self.stopping.is_set():
            await asyncio.sleep(self._backoff.next())
            if self.probe is not None:
                try:
                    async with asyncio.timeout(self.probe_timeout):
                        await self.probe()
                except Exception as exc:
                    log.debug("%s still unavailable: %r", self.service, exc)
                    continue
            if self.probe is not None:
                self._backoff.reset()
            waited = time.monotonic() - self._since
            log.warning("%s answers again after %.1fs; resuming", self.service, waited)
            self._open.set()
            return

    async def aclose(self) -> None:
        if self._prober is not None and not self._prober.done():
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
