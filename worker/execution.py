"""One attempt of one run: call the task function and turn what happened into an Outcome."""

from __future__ import annotations

import asyncio
import contextvars
import time
from typing import Any, Literal

import msgspec

from conveyor._task import Task
from conveyor.shared.context import RunContext, set_context
from conveyor.shared.errors import InvalidArguments, NonRetryableError
from conveyor.shared.models import RunStatus

from .outcome import Outcome, completed, failed, retrying

StopReason = Literal["cancel", "shutdown", "lost"]


class Execution:
    """A run executing in this worker; the heartbeat and cancel listener act on it."""

    __slots__ = (
        "attempt",
        "done",
        "handed_over",
        "message",
        "queue",
        "run_id",
        "started",
        "stop_reason",
        "task_id",
        "user_task",
    )

    def __init__(self, run_id: str, attempt: int, task_id: str, queue: str, message: Any) -> None:
        self.run_id = run_id
        self.attempt = attempt
        self.task_id = task_id
        self.queue = queue
        self.message = message
        self.started = time.monotonic()
        self.handed_over = False
        self.done = False
        self.stop_reason: StopReason | None = None
        self.user_task: asyncio.Task[Any] | None = None

    def stop(self, reason: StopReason) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.user_task is not None and not self.user_task.done():
            self.user_task.cancel()


async def run_attempt(
    task: Task[Any, Any], payload: bytes, ctx: RunContext, failures: int, execution: Execution
) -> Outcome:
    try:
        kwargs = task.decode_arguments(payload)
    except InvalidArguments as exc:
        return failed(exc)

    async def invoke() -> Any:
        set_context(ctx)
        return await task.fn(**kwargs)

    user = asyncio.create_task(invoke(), context=contextvars.copy_context())
    execution.user_task = user
    timeout = asyncio.timeout(task.max_duration)
    try:
        async with timeout:
            result = await user
    except asyncio.CancelledError:
        reason = execution.stop_reason
        if reason is None or not user.cancelled():
            raise
        return _stopped(reason)
    except TimeoutError as exc:
        if timeout.expired():
            error = TimeoutError(f"the attempt ran longer than max_duration={task.max_duration}s")
            error.__cause__ = exc
            return failed(error, RunStatus.TIMED_OUT)
        return _failure(task, exc, failures)
    except NonRetryableError as exc:
        return failed(exc)
    except Exception as exc:
        return _failure(task, exc, failures)
    try:
        return completed(msgspec.json.encode(result))
    except (TypeError, ValueError, OverflowError) as exc:
        return failed(
            NonRetryableError(f"the return value of task {task.id!r} cannot be stored: {exc}")
        )


def _failure(task: Task[Any, Any], exc: BaseException, failures: int) -> Outcome:
    failures += 1
    if failures >= task.retry.max_attempts:
        return failed(exc)
    return retrying(exc, task.retry.delay(failures))


def _stopped(reason: StopReason) -> Outcome:
    if reason == "cancel":
        return Outcome(
            run_status=RunStatus.CANCELED, attempt_status="CANCELED", error="canceled on request"
        )
    if reason == "shutdown":
        return Outcome(
            run_status=RunStatus.QUEUED,
            attempt_status="INTERRUPTED",
            error="the worker shut down before the attempt finished",
            requeue=True,
        )
    return Outcome(
        run_status=RunStatus.QUEUED,
        attempt_status="LOST",
        error="the worker lost its lease on the run",
        requeue=True,
    )
