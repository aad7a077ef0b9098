"""The scheduler process: every replica registers the schedules its modules declare and
seeks the leader lease; the leader fires cron ticks, reaps and ingests dead letters until
it stops or loses the lease, then a standby takes over."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Mapping
from typing import Any

from conveyor.shared.settings import Settings

from .cron import Ticker
from .dead import DeadLetters
from .declared import Declared
from .lease import Lease, Refused
from .reaper import Reaper
from .runtime import Runtime

log = logging.getLogger("conveyor.scheduler")

# Pause after an error talking to Redis or RabbitMQ, doubling up to the maximum.
ERROR_PAUSE = 0.5
ERROR_PAUSE_MAX = 10.0


class Scheduler:
    def __init__(
        self,
        settings: Settings | None = None,
        *,
        namespace: str | None = None,
        tasks: Mapping[str, Any] | None = None,
    ) -> None:
        """`tasks` (default: every task imported so far): whose declared schedules it
        registers."""
        self.settings = settings or Settings.from_env(namespace=namespace)
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.runtime = Runtime(self.settings, f"conveyor-scheduler:{self.id}")
        self.lease = Lease(
            self.runtime.scripts, self.runtime.keys, self.id, self.settings.scheduler_lease_ttl
        )
        self.reaper = Reaper(self.runtime, self.lease)
        self.dead = DeadLetters(self.runtime)
        self.ticker = Ticker(self.runtime, self.lease)
        self.declared = Declared(tasks)
        self.refused = 0  # fenced writes refused after losing the lease
        self._stopping = asyncio.Event()
        self._leading = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Until stop(): hold or seek the lease and, while leading, do the duties."""
        log.info("scheduler %s starting in namespace %r", self.id, self.settings.namespace)
        try:
            if not await self._until_connected():
                return
            async with asyncio.TaskGroup() as group:
                group.create_task(self._keep_lease())
                group.create_task(self._duties())
                group.create_task(self._cron())
        finally:
            with contextlib.suppress(Exception):
                await self.lease.release()  # a standby takes over at once
            await self.runtime.close()
            log.info("scheduler %s stopped", self.id)

    async def _until_connected(self) -> bool:
        """Connect to RabbitMQ, waiting for it as long as it takes; False if stopped first."""
        pause = ERROR_PAUSE
        while not self._stopping.is_set():
            try:
                await self.runtime.connect()
                return True
            except Exception as exc:
                log.warning("waiting for RabbitMQ (%r); retrying in %.1fs", exc, pause)
                pause = await self._pause(pause)
        return False

    async def _keep_lease(self) -> None:
        """Renew the lease every third of its TTL; a standby tries to take it every tenth,
        so it takes over at most a tenth of the TTL after the lease expired."""
        ttl = self.settings.scheduler_lease_ttl
        while not self._stopping.is_set():
            try:
                if self.lease.epoch:
                    if not await self.lease.renew():
                        log.warning("scheduler %s lost the leader lease", self.id)
                elif await self.lease.acquire():
                    log.info("scheduler %s leads (epoch %d)", self.id, self.lease.epoch)
            except Exception as exc:
                # No renewal: held() turns false by itself once the deadline passes, and
                # true again if a later renewal finds the lease still ours.
                log.warning("lease: Redis unavailable (%r)", exc)
            if self.lease.held():
                self._leading.set()
            else:
                self._leading.clear()
            await self._sleep(ttl / 3 if self.lease.epoch else ttl / 10)

    async def _duties(self) -> None:
        pause = ERROR_PAUSE
        while not self._stopping.is_set():
            await self._wait_leading()
            token = self.lease.token
            if self._stopping.is_set():
                return
            if not token or not self.lease.held():
                self._leading.clear()
                continue
            try:
                await self.dead.ingest(token)
                await self.reaper.reap()
                pause = ERROR_PAUSE
                await self._sleep(self.settings.reap_interval)
            except Refused as exc:
                self._refused(exc)
            except Exception as exc:
                log.warning("scheduler duties failed (%r); retrying in %.1fs", exc, pause)
                pause = await self._pause(pause)

    async def _cron(self) -> None:
        """Register the declared schedules (any replica: the writes are idempotent), then
        fire ticks while leading, on a cadence of their own: a tick is due to the second."""
        pause = ERROR_PAUSE
        declared = self.declared
        while declared.task_ids and not self._stopping.is_set():
            try:
                changed = await self.ticker.schedules.register(
                    declared.schedules, declared.task_ids
                )
                log.info(
                    "registered %d declared schedules (%d changed)",
                    len(declared.schedules),
                    changed,
                )
                break
            except Exception as exc:
                log.warning("registering schedules failed (%r); retrying in %.1fs", exc, pause)
                pause = await self._pause(pause)
        pause = ERROR_PAUSE
        while not self._stopping.is_set():
            await self._wait_leading()
            if self._stopping.is_set():
                return
            if not self.lease.held():
                self._leading.clear()
                continue
            try:
                await self._sleep(await self.ticker.tick())
                pause = ERROR_PAUSE
            except Refused as exc:
                self._refused(exc)
            except Exception as exc:
                log.warning("cron ticks failed (%r); retrying in %.1fs", exc, pause)
                pause = await self._pause(pause)

    def _refused(self, exc: Refused) -> None:
        """A fenced write found the lease gone: stop leading until it is won again."""
        self.refused += 1
        log.warning("fenced write refused (%d so far): %s", self.refused, exc)
        self.lease.lose()
        self._leading.clear()

    async def _wait_leading(self) -> None:
        stopping = asyncio.ensure_future(self._stopping.wait())
        leading = asyncio.ensure_future(self._leading.wait())
        try:
            await asyncio.wait([stopping, leading], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            leading.cancel()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _pause(self, pause: float) -> float:
        await self._sleep(pause)
        return min(pause * 2, ERROR_PAUSE_MAX)
