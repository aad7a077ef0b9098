"""The worker's side of rate and concurrency limits.

Before a delivered run is claimed, its task's limits decide whether it starts now:

- a rate limit gives a start, or reserves a later one: the message goes round the delay
  ladder to that time, carrying the reservation, and starts then without asking again
  (unless a RateLimited pause voided the reservation). No worker polls for tokens.
- a concurrency limit gives a slot (a lease in Redis, renewed with the run's lease), or
  parks the run in Redis and acks its message: the run holds no worker slot while it
  waits. A slot given back wakes the next parked run (keys in turn) by publishing its
  message again; a worker's sweep frees the slots of dead workers and wakes runs again
  whose wake-up message was lost.

A throttled run stays QUEUED and says why (Run.throttled).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec

from conveyor._task import Task
from conveyor.broker.publisher import Outgoing
from conveyor.shared import metrics, tracing
from conveyor.shared.limiter import Limiter, Wake
from conveyor.shared.limits import Concurrency, RateLimit
from conveyor.shared.models import RunMessage
from conveyor.shared.store import RunStore

log = logging.getLogger("conveyor.worker")

_encoder = msgspec.json.Encoder()

# admit(): the run was parked (its message is to be acked); any other int defers by ms.
PARKED = 0
# A parked run's message as its slot keeps it, when it has trace context to keep: this,
# the packed context, a newline, the body (whose JSON has no raw newline before its end).
_TRACED = b"trace "


class Limits:
    def __init__(
        self,
        store: RunStore,
        worker_id: str,
        publish: Callable[[list[Outgoing]], Awaitable[None]],
    ) -> None:
        self.limiter = Limiter(store)
        self.worker_id = worker_id
        self._publish = publish
        # Slots this worker holds, by run, counted per delivery that took one: a second
        # copy of a message running here (a hand-over's watchdog) takes the same slot, and
        # only the last to end gives it back.
        self._holding: dict[str, int] = {}

    async def admit(
        self,
        task: Task[Any, Any],
        msg: RunMessage,
        queue: str,
        trace: tracing.Carrier | None = None,
    ) -> int | None:
        """None: claim the run now (holding its slot, if it has a concurrency limit).
        PARKED: parked for a slot (with the message's `trace` context, for its wake);
        otherwise defer the message by that many ms (msg now carries what it reserved)."""
        run_id = msg.id
        assert run_id is not None
        rate = task.rate_limit
        if rate is not None:
            answer = await self.limiter.take_rate(rate, msg.reserved)
            if answer.go and answer.wait_ms:
                # Its turn among runs that came back together: a moment, here. (Its
                # start is taken: it goes on once the wait is over, even past a pause.)
                await asyncio.sleep(answer.wait_ms / 1000)
            if not answer.go:
                # Not the message's not_before, which workers compare with their own
                # clocks: the run's not_before (Redis's clock, throttle.lua) holds it.
                msg.reserved = f"{answer.epoch}:{answer.at_ms}"
                reason = f"{_describe(rate, task.id)}: starts at {_clock(answer.at_ms)}"
                await self.limiter.throttle(run_id, reason, answer.at_ms)
                metrics.of(task.id).run_throttled("rate")
                return max(1, answer.at_ms - answer.now_ms)
        limit = task.concurrency
        if limit is not None:
            message = _encoder.encode(msg)
            if trace:
                message = b"%s%s\n%s" % (_TRACED, tracing.pack(trace).encode(), message)
            slot = await self.limiter.take_slot(
                limit, run_id, self.worker_id, msg.concurrency_key or "", queue, message
            )
            if slot.kind == "parked":
                reason = f"{_describe(limit, task.id)}: {slot.running} of {limit.limit} running"
                await self.limiter.throttle(run_id, reason)
                metrics.of(task.id).run_throttled("concurrency")
                return PARKED
            if slot.kind == "held":
                return slot.wait_ms
            self._holding[run_id] = self._holding.get(run_id, 0) + 1
        return None

    async def release(self, task: Task[Any, Any], run_id: str) -> None:
        """Give the run's slot back and wake the runs that may take the free slots. A
        failure leaves the slot to its lease: the sweep frees it then."""
        limit = task.concurrency
        if limit is None:
            return
        left = self._holding.pop(run_id, 1) - 1
        if left > 0:
            self._holding[run_id] = left
            return
        try:
            await self._wake(await self.limiter.release_slot(limit, run_id, self.worker_id))
        except Exception as exc:
            log.warning("run %s: giving its concurrency slot back failed: %r", run_id, exc)

    async def pause(self, task: Task[Any, Any], seconds: float) -> None:
        """The downstream said 429: no run under the task's rate limit starts for that long."""
        if task.rate_limit is not None:
            until = await self.limiter.pause_rate(task.rate_limit, int(seconds * 1000))
            log.info("%s paused until %s", _describe(task.rate_limit, task.id), _clock(until))

    async def renew_and_sweep(self, held: dict[Concurrency, list[str]]) -> None:
        """Renew the slots of the runs executing here, per limit, and sweep every limit
        of this worker's tasks (`held` has them all, with no runs for an idle limit)."""
        for limit, run_ids in held.items():
            if run_ids:
                await self.limiter.renew(limit, self.worker_id, run_ids)
            await self._wake(await self.limiter.sweep(limit, self.worker_id))

    async def _wake(self, wakes: Iterable[Wake]) -> None:
        outgoing = [_woken(w) for w in wakes]
        if outgoing:
            await self._publish(outgoing)


def _woken(wake: Wake) -> Outgoing:
    body, headers = wake.message, None
    if body.startswith(_TRACED):
        packed, _, body = body[len(_TRACED) :].partition(b"\n")
        headers = tracing.unpack(packed)
    return Outgoing(wake.queue, body, message_id=wake.run_id, headers=headers)


def _describe(limit: RateLimit | Concurrency, task_id: str) -> str:
    own = limit.name == f"task:{task_id}"
    if isinstance(limit, RateLimit):
        what = f"{limit.rate:g} per {limit.per:g}s, burst {limit.burst}"
        return (
            f"rate limit of task {task_id!r} ({what})"
            if own
            else f"rate limit {limit.name!r} ({what})"
        )
    return f"concurrency limit of task {task_id!r}" if own else f"concurrency limit {limit.name!r}"


def _clock(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
