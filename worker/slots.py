"""The worker's execution slots: one per run it may execute at once.

A delivery that finds them all taken waits its turn, first come first served, for at
most `max_wait`. With prefetch above the concurrency most deliveries of a busy worker
wait, so the waits share one timer (the oldest waiter's deadline comes first) instead
of an asyncio.Semaphore with an asyncio.timeout each, which cost a worker about a
twentieth of its CPU per no-op run.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Slots:
    def __init__(self, size: int, max_wait: float) -> None:
        self.max_wait = max_wait
        self._free = size
        # (deadline on the loop's clock, future); a done future is a waiter that left
        self._waiters: deque[tuple[float, asyncio.Future[None]]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    async def acquire(self) -> None:
        """Take a slot; TimeoutError after waiting max_wait for one."""
        if self._free and not self._waiters:
            self._free -= 1
            return
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        self._waiters.append((loop.time() + self.max_wait, turn))
        if self._timer is None:
            self._timer = loop.call_at(self._waiters[0][0], self._expire)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self.release()  # handed a slot as the cancel came: pass it on
            turn.cancel()  # a waiter that left: skipped when its turn comes
            raise

    def release(self) -> None:
        """Give a slot back: to the oldest waiter, if any."""
        waiters = self._waiters
        while waiters:
            _, turn = waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        waiters = self._waiters
        while waiters and (waiters[0][0] <= now or waiters[0][1].done()):
            _, turn = waiters.popleft()
            if not turn.done():
                turn.set_exception(TimeoutError())
        if waiters:
            self._timer = loop.call_at(waiters[0][0], self._expire)
