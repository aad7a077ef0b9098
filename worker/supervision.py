"""Background duties of a worker: renew leases, hand long runs over before RabbitMQ's
consumer_timeout, and stop runs that were canceled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("conveyor.worker")


class Supervisor:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._renew_leases(), name="conveyor-leases"),
            asyncio.create_task(self._listen_for_cancels(), name="conveyor-cancels"),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    async def _renew_leases(self) -> None:
        interval = self.worker.settings.lease_ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.renew_once(interval)
            except Exception as exc:
                log.warning("lease renewal failed: %r", exc)

    async def renew_once(self, min_age: float) -> None:
        worker = self.worker
        now = time.monotonic()
        due = [e for e in worker.inflight.values() if not e.done and now - e.started >= min_age]
        if not due:
            return
        replies = await worker.store.heartbeat([(e.run_id, e.attempt) for e in due], worker.id)
        for execution, reply in zip(due, replies, strict=True):
            if reply == "ok":
                continue
            if reply == "CANCELED":
                execution.stop("cancel")
            elif not execution.done:
                log.warning(
                    "run %s: lost its lease (%s); stopping it here", execution.run_id, reply
                )
                execution.stop("lost")
        handover_after = worker.settings.handover_after
        for execution in due:
            if (
                not execution.handed_over
                and not execution.done
                and now - execution.started >= handover_after
            ):
                try:
                    await worker.hand_over(execution)
                except Exception as exc:
                    log.warning("run %s: hand-over failed: %r", execution.run_id, exc)

    async def _listen_for_cancels(self) -> None:
        worker = self.worker
        while True:
            try:
                async with worker.redis.pubsub() as pubsub:
                    await pubsub.subscribe(worker.store.keys.cancel_channel)
                    async for item in pubsub.listen():
                        if item.get("type") != "message":
                            continue
                        execution = worker.inflight.get(item["data"].decode())
                        if execution is not None:
                            execution.stop("cancel")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cancel listener: %r; reconnecting", exc)
                await asyncio.sleep(1)
