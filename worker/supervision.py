"""Background duties of a worker: renew leases, hand long runs over before RabbitMQ's
consumer_timeout, and stop runs that were canceled.

Renewals depend on Redis alone. Each attempt is renewed a third of the lease after its
claim was sent and every third after each renewal, so a renewal is due well before the
lease ends whatever the timing of the claim's reply. Hand-overs publish to RabbitMQ, which
may be slow, blocked or restarting: each runs in a task of its own, so a renewal never
waits behind one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from conveyor.shared.limits import Concurrency

from .execution import Execution

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("conveyor.worker")


class Supervisor:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._tasks: list[asyncio.Task[None]] = []
        self._handovers: set[asyncio.Task[None]] = set()
        self._limits: dict[str, Concurrency] = {
            t.id: t.concurrency for t in worker.tasks.values() if t.concurrency is not None
        }

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._renew_leases(), name="conveyor-leases"),
            asyncio.create_task(self._listen_for_cancels(), name="conveyor-cancels"),
        ]

    async def stop(self) -> None:
        for t in [*self._tasks, *self._handovers]:
            t.cancel()
        for t in [*self._tasks, *self._handovers]:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    async def _renew_leases(self) -> None:
        # Ticks at a sixth of the lease: a renewal is made at most that late.
        tick = self.worker.settings.lease_ttl / 6
        while True:
            await asyncio.sleep(tick)
            try:
                await self.renew_once()
                await self._renew_slots()
            except Exception as exc:
                if self.worker.redis_gate.is_open:
                    log.warning("lease renewal failed: %r", exc)
                else:  # the outage was logged once already
                    log.debug("lease renewal failed: %r", exc)
            self._hand_over_long_runs()

    async def _renew_slots(self) -> None:
        """Renew the concurrency slots of the runs executing here (each tick: a slot's
        lease is as long as a run's) and sweep the limits of this worker's tasks."""
        worker = self.worker
        if not self._limits:
            return
        held: dict[Concurrency, list[str]] = {limit: [] for limit in self._limits.values()}
        for execution in worker.inflight.values():
            limit = self._limits.get(execution.task_id)
            if limit is not None and not execution.done:
                held[limit].append(execution.run_id)
        await worker.limits.renew_and_sweep(held)

    async def renew_once(self) -> None:
        worker = self.worker
        now = time.monotonic()
        every = worker.settings.lease_ttl / 3
        due = [e for e in worker.inflight.values() if not e.done and now - e.leased_at >= every]
        if not due:
            return
        replies = await worker.store.heartbeat([(e.run_id, e.attempt) for e in due], worker.id)
        for execution, reply in zip(due, replies, strict=True):
            if reply == "ok":
                execution.leased_at = now
                continue
            if reply == "CANCELED":
                execution.stop("cancel")
            elif not execution.done:
                log.warning(
                    "run %s: attempt %d lost its lease (%s); stopping it here",
                    execution.run_id,
                    execution.attempt,
                    reply,
                )
                execution.stop("lost")

    def _hand_over_long_runs(self) -> None:
        worker = self.worker
        now = time.monotonic()
        for execution in list(worker.inflight.values()):
            if (
                not execution.handing_over
                and not execution.done
                and now - execution.started >= worker.settings.handover_after
            ):
                execution.handing_over = True
                task = asyncio.create_task(self._hand_over(execution))
                self._handovers.add(task)
                task.add_done_callback(self._handovers.discard)

    async def _hand_over(self, execution: Execution) -> None:
        try:
            await self.worker.hand_over(execution)
        except Exception as exc:
            log.warning("run %s: hand-over failed: %r; trying again", execution.run_id, exc)
            execution.handing_over = False

    async def _listen_for_cancels(self) -> None:
        worker = self.worker
        # Polled with a timeout rather than a blocking listen(): the connection's socket
        # timeout would end a quiet listen(), and each poll checks the connection's health.
        poll = worker.settings.redis_timeout / 2
        while True:
            try:
                async with worker.redis.pubsub() as pubsub:
                    await pubsub.subscribe(worker.store.keys.cancel_channel)
                    while True:
                        item = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=poll
                        )
                        if item is None or item.get("type") != "message":
                            continue
                        run_id = item["data"].decode()
                        for execution in list(worker.inflight.values()):
                            if execution.run_id == run_id:
                                execution.stop("cancel")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if worker.redis_gate.is_open:
                    log.warning("cancel listener: %r; reconnecting", exc)
                await asyncio.sleep(1)
