"""The reaper: republishes runs that nothing moves any more.

Every run enters the due index (`{ns}:{sched}:due`, run id -> epoch ms by which it should
have started) when it is created. The hot path never touches it again; the reaper looks
at entries more than `reap_after` past their time and, by the run's state:

- gone or terminal: the entry is removed;
- QUEUED or DELAYED, never started and past its ttl: it ends EXPIRED (expire.lua) instead
  of being republished. A child run a parent's step waits for has its message published
  first: that copy is how its end reaches the parent (the worker's claim hands it over
  before acking) should this scheduler die before telling the parent itself;
- EXECUTING under a live lease, or not due yet (not_before ahead): the entry moves to
  that time;
- QUEUED, DELAYED or RETRYING past due, WAITING past its earliest timer, or EXECUTING
  with an expired lease: its message is
  republished by run id (the claim dedupes a message that was not lost after all) and
  the entry moves on, each further republish of the same run backing off twice as long.

A stranded run is so republished at most `reap_after` + `reap_interval` after it was due
while a scheduler leads (plus up to `scheduler_lease_ttl` after a leader dies).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import msgspec

from conveyor.broker.publisher import Outgoing
from conveyor.shared import metrics, tracing
from conveyor.shared.batcher import Arg
from conveyor.shared.models import RunMessage, RunStatus
from conveyor.shared.store import RunState
from conveyor.shared.waits import child_result, notify_parent

from .lease import Lease, Refused
from .runtime import Runtime

log = logging.getLogger("conveyor.scheduler")

BATCH = 500
# Republishes per pass: a deep backlog of stranded runs is repaired over several passes
# instead of flooding the broker at once. Entries that need no republish are not limited.
REPUBLISH_PER_PASS = 5000
# Repeated republishes of one run wait up to this many times reap_after.
MAX_BACKOFF = 16
# Runs whose republishes the leader counts (for the backoff) before it forgets them all.
MAX_TRACKED = 100_000

_encoder = msgspec.json.Encoder()
_WAITING = {RunStatus.QUEUED, RunStatus.DELAYED, RunStatus.RETRYING}
# _judge's verdict for a run past its ttl.
EXPIRE = -1


class Reaper:
    def __init__(self, runtime: Runtime, lease: Lease) -> None:
        self.rt = runtime
        self.lease = lease
        self.after_ms = int(runtime.settings.reap_after * 1000)
        # Republishes per run, for the backoff; only the current leader's memory.
        self._times: dict[str, int] = {}

    async def reap(self) -> int:
        """One pass; returns how many runs were republished. Raises Refused if the lease
        was lost (nothing is then written)."""
        done = 0
        while done < REPUBLISH_PER_PASS and self.lease.held():
            now = await self._now()
            entries: list[Any] = await self.rt.redis.zrangebyscore(
                self.rt.keys.due, "-inf", now - self.after_ms, start=0, num=BATCH
            )
            if not entries:
                break
            done += await self._batch([e.decode() for e in entries], now)
            if len(entries) < BATCH:
                break
        return done

    async def _batch(self, run_ids: list[str], now: int) -> int:
        states = await self.rt.store.states(run_ids)
        removed: list[str] = []
        moved: list[tuple[int, str]] = []
        stranded: list[str] = []
        expiring: list[str] = []
        for run_id, state in zip(run_ids, states, strict=True):
            verdict = self._judge(state, now)
            if verdict is None:
                removed.append(run_id)
                self._times.pop(run_id, None)
            elif verdict == EXPIRE:
                expiring.append(run_id)
                if state is not None and state.waited_for:
                    stranded.append(run_id)
            elif verdict:
                moved.append((verdict, run_id))
            else:
                stranded.append(run_id)
        if stranded:
            await self._republish(stranded)
        later = stranded
        if expiring:
            expired = await self._expire(expiring)
            removed += expired
            for run_id in expired:
                self._times.pop(run_id, None)
            # One not expired after all (a worker started it meanwhile) is looked at again.
            later = [r for r in stranded if r not in expired]
            later += [r for r in expiring if r not in expired and r not in later]
        for run_id in later:
            n = self._times.get(run_id, 0)
            self._times[run_id] = n + 1
            moved.append((now + self.after_ms * (min(2**n, MAX_BACKOFF) - 1), run_id))
        await self._write(removed, moved)
        return len(stranded)

    def _judge(self, state: RunState | None, now: int) -> int | None:
        """None: drop the entry; a time: move it there; 0: republish the run."""
        if state is None or state.status.is_terminal:
            return None
        if state.expired(now):
            return EXPIRE
        if state.status is RunStatus.EXECUTING and state.lease_until > now:
            return state.lease_until
        if state.status in _WAITING and state.not_before > now:
            return state.not_before
        if state.status in _WAITING and state.throttled:
            # Parked for a concurrency slot: its limit wakes it (worker/limits.py). Looked
            # at again rarely, for a park that Redis lost.
            return now + self.after_ms * MAX_BACKOFF
        if state.status in _WAITING or state.status is RunStatus.EXECUTING:
            return 0
        if state.status is RunStatus.WAITING and state.not_before:
            # Waiting for a timer (a sleep): its wake-up message is due.
            return state.not_before if state.not_before > now else 0
        return now  # waiting for child runs, whose ends wake it: look again later

    async def _republish(self, run_ids: Sequence[str]) -> None:
        if not self.lease.held():
            raise Refused("lease lost before republishing")
        outgoing = [
            Outgoing(
                r.queue, _encoder.encode(r.message), message_id=r.message.id, headers=r.headers
            )
            for r in await self.rt.store.republishes(run_ids)
            if r is not None
        ]
        failed = await self.rt.publisher.publish_by_queue(outgoing)
        # A queue that cannot take them: its runs are tried again after the backoff.
        for queue, exc in failed.items():
            log.warning("cannot republish runs to queue %r: %s", queue, exc)
        published = sum(o.queue not in failed for o in outgoing)
        if published:
            metrics.republished.add(published)
            log.info("republished %d stranded runs", published)
        if len(self._times) > MAX_TRACKED:
            self._times.clear()  # only the backoff is lost

    async def _expire(self, run_ids: Sequence[str]) -> set[str]:
        """End runs past their ttl EXPIRED and tell the parents waiting for them; the ids of
        those ended (one a worker started meanwhile is left to it)."""
        if not self.lease.held():
            raise Refused("lease lost before expiring runs")
        store = self.rt.store
        ends = await asyncio.gather(*(store.expire(run_id) for run_id in run_ids))
        expired = {run_id for run_id, end in zip(run_ids, ends, strict=True) if end is not None}
        for run_id, end in zip(run_ids, ends, strict=True):
            if end is not None and end.parent_step:
                await notify_parent(
                    store,
                    self._publish_one,
                    end.parent,
                    end.parent_step,
                    run_id,
                    child_result(RunStatus.EXPIRED.value, b"", end.error),
                )
        if expired:
            log.info("expired %d runs not started within their ttl", len(expired))
        return expired

    async def _publish_one(
        self, queue: str, message: RunMessage, headers: tracing.Carrier | None
    ) -> None:
        outgoing = Outgoing(queue, _encoder.encode(message), message_id=message.id, headers=headers)
        for failed, exc in (await self.rt.publisher.publish_by_queue([outgoing])).items():
            # The parent is QUEUED now: republished as stranded if this was lost.
            log.warning("cannot publish a resumed run to queue %r: %s", failed, exc)

    async def _write(self, removed: list[str], moved: list[tuple[int, str]]) -> None:
        args: list[Arg] = [self.lease.token, len(removed), *removed]
        for score, run_id in moved:
            args += (score, run_id)
        ok = await self.rt.scripts.call("sched_due", [self.rt.keys.leader, self.rt.keys.due], args)
        if not ok:
            raise Refused(f"due index write refused: epoch {self.lease.epoch} lost the lease")

    async def _now(self) -> int:
        seconds, micros = await self.rt.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000
