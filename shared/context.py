"""The run being executed, carried in a contextvar so that steps find it without plumbing."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from datetime import datetime
from typing import Any, Literal

import msgspec
from opentelemetry.trace import Tracer

from . import tracing
from .codec import decoder_for
from .errors import (
    ConveyorError,
    NonRetryableError,
    RateLimited,
    RunLost,
    StepResultNotSerializable,
)
from .retry import Retry
from .store import Lineage, NewRun, RunStore, WaitRequest


class RunInfo(msgspec.Struct, frozen=True):
    """What task code can know about its run: `current_run()` returns it."""

    id: str
    task_id: str
    attempt: int
    # Inside a step: a key for the step's side effects, the same on every attempt of the
    # run, to pass to an API that takes an idempotency key (a payment, an email).
    step_idempotency_key: str | None = None
    # The time its cron tick was scheduled for (not when it fired); None unless a
    # schedule made the run.
    scheduled_at: datetime | None = None


# Starts child runs for a waiting step: creates those not created yet and publishes them.
Spawn = Callable[[list[NewRun]], Awaitable[None]]
# Begins what pending waits wait for; returns the outcomes of those found over meanwhile.
Start = Callable[[list[WaitRequest]], Awaitable[dict[str, bytes]]]
# Stops the attempt from inside: the run was lost, or all it does is wait.
Stop = Callable[[Literal["lost", "suspend"]], None]


class RunContext:
    __slots__ = (
        "_busy",
        "_checking",
        "_counters",
        "_pending",
        "checkpoints",
        "gone",
        "info",
        "lineage",
        "replayed",
        "spawn",
        "stop",
        "store",
        "tracer",
        "worker",
    )

    def __init__(
        self,
        info: RunInfo,
        store: RunStore,
        checkpoints: dict[str, bytes],
        *,
        worker: str,
        stop: Stop,
        spawn: Spawn | None = None,
        lineage: Lineage | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.info = info
        self.store = store
        self.checkpoints = checkpoints
        self.worker = worker
        # Stops the attempt: "lost" when a checkpoint finds the run no longer this
        # attempt's, "suspend" when all it does is wait.
        self.stop = stop
        self.spawn = spawn
        self.lineage = lineage  # set when this run is a child run
        self.tracer = tracer  # None: steps and waits make no spans
        self.gone: RunLost | None = None  # then no further step runs, even if that was caught
        self.replayed: list[str] = []
        self._counters: dict[str, int] = {}
        # Steps and wait records under way, and waits not over: when nothing is under way
        # and something waits, the attempt suspends (suspend_when_idle).
        self._busy = 0
        self._pending = 0
        self._checking = False

    @property
    def root(self) -> str:
        """The root of this run's tree (itself for a run nobody triggered)."""
        return self.lineage.root if self.lineage is not None else self.info.id

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
            if self.tracer is not None:
                tracing.replayed(self.tracer, _step_span(key), {"conveyor.step.key": key})
            return decoder_for(result_type).decode(saved)
        span = None
        if self.tracer is not None:
            span = tracing.InternalSpan(self.tracer, _step_span(key), {"conveyor.step.key": key})
        self._busy += 1
        try:
            result = await self._call(key, retry, functools.partial(fn, *args, **kwargs))
            result = await self._save(key, result_type, result)
        except Exception as exc:
            if span is not None:
                span.fail(exc)
            raise
        finally:
            self._busy -= 1
            self._suspend_when_idle()
            if span is not None:
                span.end()
        return result

    async def _call(self, key: str, retry: Retry | None, fn: Callable[[], Any]) -> Any:
        """The step's function, retried in process by `retry`."""
        attempt = 1
        while True:
            step = _step.set(key)
            try:
                result = fn()
                if inspect.isawaitable(result):
                    result = await result
                break
            except (NonRetryableError, RateLimited, asyncio.CancelledError):
                raise
            except Exception:
                if retry is None or attempt >= retry.max_attempts:
                    raise
                await asyncio.sleep(retry.delay(attempt))
                attempt += 1
            finally:
                _step.reset(step)
        return result

    async def _save(self, key: str, result_type: Any, result: Any) -> Any:
        """Checkpoint a step's result; the result that stands (saved first wins)."""
        try:
            encoded = msgspec.json.encode(result)
        except (TypeError, ValueError, OverflowError) as exc:
            raise StepResultNotSerializable(key, str(exc)) from exc
        try:
            stands = await self.store.checkpoint(
                self.info.id, self.worker, self.info.attempt, key, encoded
            )
        except RunLost as exc:
            self._lose(exc)
            raise
        self.checkpoints[key] = stands
        if stands is not encoded:  # saved first by an earlier try of this same write
            return decoder_for(result_type).decode(stands)
        return result

    async def wait(self, requests: list[WaitRequest], start: Start | None = None) -> list[bytes]:
        """The saved outcomes of these waits (WaitResult JSON), once all are over. Until
        then it records them, lets `start` begin what the pending ones wait for (it
        returns the outcomes of any found over meanwhile), and never returns: when nothing
        else in the run is under way, the attempt is suspended."""
        if self.gone is not None:
            raise self.gone
        known = [self.checkpoints.get(r.key) for r in requests]
        name = f"wait {requests[0].kind}"
        attributes: dict[str, Any] = {"conveyor.step.key": requests[0].key}
        if len(requests) > 1:
            attributes["conveyor.wait.count"] = len(requests)
        if all(k is not None for k in known):
            self.replayed += [r.key for r in requests]
            if self.tracer is not None:
                tracing.replayed(self.tracer, name, attributes)
            return [k for k in known if k is not None]
        if self.tracer is None:
            return await self._wait(requests, start)
        # Ends when the wait is over or the attempt suspends (cancelled while it waits).
        span = tracing.InternalSpan(self.tracer, name, attributes)
        try:
            return await self._wait(requests, start)
        except asyncio.CancelledError:
            span.span.set_attribute("conveyor.wait.suspended", True)
            raise
        except Exception as exc:
            span.fail(exc)
            raise
        finally:
            span.end()

    async def _wait(self, requests: list[WaitRequest], start: Start | None) -> list[bytes]:
        self._busy += 1
        try:
            states = await self.store.wait(self.info.id, self.worker, self.info.attempt, requests)
            results = {r.key: st.result for r, st in zip(requests, states, strict=True)}
            pending = [r for r in requests if results[r.key] is None]
            if pending and start is not None:
                results.update(await start(pending))
        except RunLost as exc:
            self._lose(exc)
            raise
        finally:
            self._busy -= 1
        over = [results[r.key] for r in requests]
        if all(o is not None for o in over):
            done = [o for o in over if o is not None]
            for r, o in zip(requests, done, strict=True):
                self.checkpoints[r.key] = o
            return done
        self._pending += 1
        self._suspend_when_idle()
        # Never set: the suspension cancels the attempt while it waits here.
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")

    def _lose(self, exc: RunLost) -> None:
        self.gone = exc
        self.stop("lost")

    def _suspend_when_idle(self) -> None:
        """Suspend the attempt once a wait is pending and nothing else is under way for
        two turns of the event loop (waits started together by asyncio.gather all get to
        record themselves first)."""
        if self._pending and not self._busy and not self._checking:
            self._checking = True
            asyncio.get_running_loop().call_soon(self._check_idle, 2)

    def _check_idle(self, turns: int) -> None:
        if self._busy or not self._pending:
            self._checking = False
        elif turns > 1:
            asyncio.get_running_loop().call_soon(self._check_idle, turns - 1)
        else:
            self._checking = False
            self.stop("suspend")


def _step_span(key: str) -> str:
    """A step span's name: the step's name, without the call index (names stay few)."""
    return f"step {key.rpartition('#')[0] or key}"


_current: ContextVar[RunContext | None] = ContextVar("conveyor_run", default=None)
# The key of the step whose function is running (in its task's context).
_step: ContextVar[str | None] = ContextVar("conveyor_step", default=None)


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
    step = _step.get()
    if step is None:
        return ctx.info
    return msgspec.structs.replace(ctx.info, step_idempotency_key=f"{ctx.info.id}:{step}")
