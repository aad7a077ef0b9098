"""How result() waits: one subscription per Client and batched reads, no polling per run.

Every script that ends a run publishes the run's id on the namespace's `ended` channel
(shared/lua/*.lua). A Client's Endings keeps the futures of the result() calls waiting,
by run id, and two tasks, started by the first wait and stopped by close():

- the listener holds one pub/sub subscription to the channel while anything waits (every
  end in the namespace arrives there) and queues the runs whose notice arrives, if
  anyone waits for them;
- the reader reads the queued runs in pipelines on one connection (all that were queued
  while its last read was under way), and settles the waits of the runs that ended.

A wait is registered before its run is first read, so an end between that read and the
subscription is not missed. A notice can be lost all the same (the subscription
reconnecting, Redis restarting): after every (re)subscription every waited run is read
again, and every `result_recheck` seconds too, so no wait depends on one notice. While
Redis does not answer, the reader backs off and tries again; each wait still ends at its
timeout, its ResultTimeout saying why Redis did not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from conveyor.shared.availability import Backoff
from conveyor.shared.errors import ResultTimeout, RunNotFound, ServiceUnavailable, describe
from conveyor.shared.models import RunStatus
from conveyor.shared.settings import Settings
from conveyor.shared.store import RunStore, StatusView

log = logging.getLogger("conveyor")

# Runs per pipeline: bounds what one reply holds (outputs included) and how long Redis
# spends on one batch.
READ_CHUNK = 1000
# Seconds the subscription outlives the last wait, for the next one; past that, a busy
# namespace's notices would cost a client that waits for nothing.
LINGER = 2.0


class Endings:
    def __init__(self, store: RunStore, settings: Settings) -> None:
        self._store = store
        self._recheck = settings.result_recheck
        # The subscription is polled this often, and pinged when quiet: a connection that
        # leaves a PING unanswered for redis_timeout is half-open and is replaced.
        self._poll = settings.redis_timeout / 2
        self._ping_timeout = settings.redis_timeout
        self._waiting: dict[str, list[asyncio.Future[StatusView]]] = {}
        self._seen: dict[str, RunStatus] = {}  # the last status read of each waited run
        self._due: set[str] = set()
        self._wake = asyncio.Event()
        self._wanted = asyncio.Event()  # set while any wait is registered
        self._unavailable: str | None = None  # why the last read failed, if it did
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    async def wait(self, run_id: str, timeout: float | None) -> StatusView:
        """The run's status once it has ended; RunNotFound, or ResultTimeout after
        `timeout` seconds (None: no limit)."""
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._read()), loop.create_task(self._listen())]
        future: asyncio.Future[StatusView] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(run_id, []).append(future)
        self._wanted.set()
        self._queue(run_id)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            seen = self._seen.get(run_id)
            raise ResultTimeout(
                run_id, timeout or 0.0, seen.value if seen else "unknown", self._unavailable
            ) from None
        finally:
            self._forget(run_id, future)

    async def aclose(self) -> None:
        # The flag and the events end the loops even where redis-py turns a cancellation
        # into an error of its own, which the loops would take for Redis being down.
        self._closed = True
        self._wake.set()
        self._wanted.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        self._tasks = []
        for run_id, futures in self._waiting.items():
            for future in futures:
                if not future.done():
                    future.set_exception(
                        ServiceUnavailable(f"the Client was closed while waiting for run {run_id}")
                    )

    def _queue(self, run_id: str) -> None:
        self._due.add(run_id)
        self._wake.set()

    def _forget(self, run_id: str, future: asyncio.Future[StatusView]) -> None:
        futures = self._waiting.get(run_id, [])
        if future in futures:
            futures.remove(future)
        if not futures:
            self._waiting.pop(run_id, None)
            self._seen.pop(run_id, None)
            if not self._waiting:
                self._wanted.clear()
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()  # settled as the wait timed out: nobody will read it

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(first=0.05, cap=2.0)
        recheck_at = loop.time() + self._recheck
        while not self._closed:
            if not self._due:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(recheck_at):
                        await self._wake.wait()
            if loop.time() >= recheck_at:
                self._due.update(self._waiting)
                recheck_at = loop.time() + self._recheck
            due = [run_id for run_id in self._due if run_id in self._waiting]
            self._due.clear()
            try:
                for start in range(0, len(due), READ_CHUNK):
                    chunk = due[start : start + READ_CHUNK]
                    self._settle(chunk, await self._store.statuses(chunk))
            except Exception as exc:  # Redis unavailable (or a reply that did not decode)
                self._unavailable = describe(exc)
                self._due.update(due)
                log.debug("result(): reading runs failed: %s; trying again", self._unavailable)
                await asyncio.sleep(backoff.next())
                continue
            self._unavailable = None
            backoff.reset()

    def _settle(self, run_ids: list[str], views: list[StatusView | None]) -> None:
        for run_id, view in zip(run_ids, views, strict=True):
            if view is not None and not view.status.is_terminal:
                self._seen[run_id] = view.status
                continue
            for future in self._waiting.get(run_id, []):
                if future.done():
                    continue
                if view is None:
                    future.set_exception(RunNotFound(run_id))
                else:
                    future.set_result(view)

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(first=0.1, cap=5.0)
        while not self._closed:
            await self._wanted.wait()
            try:
                async with self._store.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._store.keys.ended_channel)
                    pinged: float | None = None
                    idle_since = None
                    while not self._closed:
                        if self._waiting:
                            idle_since = None
                        elif idle_since is None:
                            idle_since = loop.time()
                        elif loop.time() - idle_since > LINGER:
                            break  # unsubscribed as the pubsub closes
                        item = await pubsub.get_message(timeout=self._poll)
                        if item is None:
                            if pinged is None:
                                pinged = loop.time()
                                await pubsub.ping()
                            elif loop.time() - pinged > self._ping_timeout:
                                raise TimeoutError("the subscription left a PING unanswered")
                            continue
                        pinged = None
                        if item["type"] == "subscribe":
                            # Subscribed anew (redis-py also subscribes again by itself
                            # after a reconnect): notices sent meanwhile are lost.
                            backoff.reset()
                            self._due.update(self._waiting)
                            self._wake.set()
                        elif item["type"] == "message":
                            run_id = item["data"].decode()
                            if run_id in self._waiting:
                                self._queue(run_id)
            except Exception as exc:
                log.debug("result(): subscription lost: %s; subscribing again", describe(exc))
                await asyncio.sleep(backoff.next())
