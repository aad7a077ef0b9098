"""Which runs may start in this worker: a run's last chance after crashes executes alone.

When a worker process dies, every run it was executing is charged a crash, the poison
message that killed it and its innocent neighbours alike. A run whose worker died
`max_crashes - 1` times gets its last attempt only in a worker running nothing else
(claim.lua refuses it otherwise), and nothing else starts there until it ends. So a run
ends CRASHED only for a death it alone can have caused: runs that merely shared a worker
with a poison message always get another attempt.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from conveyor.shared.store import Claim, RunStore


def last_chance(crashes: int, max_crashes: int) -> bool:
    """Whether one more crash ends the run (the same rule as claim.lua)."""
    return crashes > 0 and crashes >= max_crashes - 1


class Admission:
    """Counts the claims and runs under way here. All of it is synchronous bookkeeping
    in one event loop; a claim only waits (and only then costs a future) when a last
    chance is pending or running."""

    def __init__(
        self, store: RunStore, worker_id: str, stopping: asyncio.Event, *, max_wait: float
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self._stopping = stopping
        # A claim waits at most this long to be admitted (behind a last chance, or as one
        # waiting for the worker to empty), then goes round the delay ladder as busy
        # rather than hold its delivery any longer.
        self.max_wait = max_wait
        self._active = 0  # runs being claimed or executing here
        self._exclusive = False  # a claim or run that must be alone is under way
        self._alone_run: str | None = None
        self._waiting = 0  # last chances waiting for this worker to empty
        self._wakeups: list[asyncio.Future[None]] = []  # claims waiting for a change
        self._tokens = itertools.count(1)  # claim tokens: unique per claim in this worker

    async def claim(self, run_id: str) -> Claim:
        """Claim a run (store.claim), telling the store whether nothing else runs here.

        A last chance refused because this worker is busy waits here, with no new run
        starting meanwhile, until the worker is empty, and is claimed again alone."""
        try:
            alone = await self._admit(lambda: not self._exclusive and not self._waiting)
        except TimeoutError:
            return self._later()
        if alone is None:
            return Claim("busy")  # shutting down: the message goes back, deferred
        claim = await self._claim(run_id, alone)
        if claim.kind == "alone":
            self._waiting += 1
            try:
                alone = await self._admit(lambda: not self._active and not self._exclusive)
            except TimeoutError:
                return self._later()
            finally:
                self._waiting -= 1
                self._changed()
            if alone is None:
                return Claim("busy")
            claim = await self._claim(run_id, alone)
        if claim.kind == "run" and alone:
            if last_chance(claim.crashes, self.store.settings.max_crashes):
                self._alone_run = run_id  # exclusive until finished()
            else:
                self._exclusive = False
                self._changed()
        return claim

    def _later(self) -> Claim:
        """Waited max_wait to be admitted: come back later, round the delay ladder."""
        return Claim("busy", wait_ms=int(self.store.settings.lease_ttl * 1000))

    def finished(self, run_id: str) -> None:
        """An execution that a claim started here has ended."""
        alone = self._alone_run == run_id
        if alone:
            self._alone_run = None
        self._leave(alone)

    async def _admit(self, ready: Callable[[], bool]) -> bool | None:
        """Wait until `ready`, then count a claim in; whether it is alone here, or None
        when the worker is stopping. TimeoutError after max_wait (no timer unless it waits)."""
        if not ready():
            loop = asyncio.get_running_loop()
            async with asyncio.timeout_at(loop.time() + self.max_wait):
                while not ready():
                    wakeup = loop.create_future()
                    self._wakeups.append(wakeup)
                    try:
                        await wakeup
                    finally:
                        if not wakeup.done():  # canceled: do not leave it behind
                            self._wakeups.remove(wakeup)
        if self._stopping.is_set():
            return None
        alone = self._active == 0
        self._active += 1
        if alone:
            self._exclusive = True  # until the claim says whether the run must be alone
        return alone

    async def _claim(self, run_id: str, alone: bool) -> Claim:
        """store.claim; counts the claim out again unless it started a run."""
        try:
            claim = await self.store.claim(
                run_id, self.worker_id, str(next(self._tokens)), alone=alone
            )
        except BaseException:
            self._leave(alone)
            raise
        if claim.kind != "run":
            self._leave(alone)
        return claim

    def _leave(self, alone: bool) -> None:
        self._active -= 1
        if alone:
            self._exclusive = False
        self._changed()

    def _changed(self) -> None:
        """Let every waiting claim look again."""
        wakeups, self._wakeups = self._wakeups, []
        for wakeup in wakeups:
            if not wakeup.done():
                wakeup.set_result(None)
