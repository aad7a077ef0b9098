"""The run being executed, carried in a contextvar so that steps find it without plumbing."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from contextvars import ContextVar
from datetime import datetime
from typing import Any

import msgspec

from .codec import decoder_for
from .errors import ConveyorError, NonRetryableError, RunLost, StepResultNotSerializable
from .retry import Retry
from .store import RunStore


class RunInfo(msgspec.Struct, frozen=True):
    """What task code can know about its run: `current_run()` returns it."""

    id: str
    task_id: str
    attempt: int
    # The time its cron tick was scheduled for (not when it fired); None unless a
    # schedule made the run.
    scheduled_at: datetime | None = None


class RunContext:
    __slots__ = (
        "_counters",
        "checkpoints",
        "gone",
        "info",
        "lost",
        "replayed",
        "store",
        "worker",
    )

    def __init__(
        self,
        info: RunInfo,
        store: RunStore,
        checkpoints: dict[str, bytes],
        *,
        worker: str,
        lost: Callable[[], None],
    ) -> None:
        self.info = info
        self.store = store
        self.checkpoints = checkpoints
        self.worker = worker
        # Called when a checkpoint finds the run no longer this attempt's: stops the attempt.
        self.lost = lost
        self.gone: RunLost | None = None  # then no further step runs, even if that was caught
        self.replayed: list[str] = []
        self._counters: dict[str, int] = {}

    def step_key(self, name: str) -> str:
        """The key of the next call of step `name` in this run: name plus call index.

        Assigned when the step is called, not when it is awaited, so that steps started
        together (asyncio.gather) get the same keys on every replay."""
        index = self._counters.get(name, 0)
        self._counters[name] = index + 1
        return f"{name}#{index}"

    async def run_step(
        self,
        key: str,
        result_type: Any,
        retry: Retry | None,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if self.gone is not None:
            raise self.gone
        saved = self.checkpoints.get(key)
        if saved is not None:
            self.replayed.append(key)
            return decoder_for(result_type).decode(saved)
        attempt = 1
        while True:
            try:
                result = fn(*args, **kwargs)
                if inspect.isawaitable(result):
                    result = await result
                break
            except (NonRetryableError, asyncio.CancelledError):
                raise
            except Exception:
                if retry is None or attempt >= retry.max_attempts:
                    raise
                await asyncio.sleep(retry.delay(attempt))
                attempt += 1
        try:
            encoded = msgspec.json.encode(result)
        except (TypeError, ValueError, OverflowError) as exc:
            raise StepResultNotSerializable(key, str(exc)) from exc
        try:
            stands = await self.store.checkpoint(
                self.info.id, self.worker, self.info.attempt, key, encoded
            )
        except RunLost as exc:
            self.gone = exc
            self.lost()
            raise
        self.checkpoints[key] = stands
        if stands is not encoded:  # saved first by an earlier try of this same write
            return decoder_for(result_type).decode(stands)
        return result


_current: ContextVar[RunContext | None] = ContextVar("conveyor_run", default=None)


def current_context() -> RunContext | None:
    return _current.get()


def set_context(ctx: RunContext | None) -> None:
    _current.set(ctx)


def current_run() -> RunInfo:
    """The run this code executes in: id, task id, attempt number and, for a run a
    schedule made, the time its tick was scheduled for."""
    ctx = _current.get()
    if ctx is None:
        raise ConveyorError("current_run() was called outside a conveyor run")
    return ctx.info
