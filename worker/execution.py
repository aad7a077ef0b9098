"""One attempt of one run: call the task function and turn what happened into an Outcome."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

import msgspec

from conveyor._task import Task
from conveyor.shared.context import RunContext, set_context
from conveyor.shared.errors import (
    InvalidArguments,
    NonRetryableError,
    RateLimited,
    RunLost,
    ServiceUnavailable,
)
from conveyor.shared.models import RunStatus

from .outcome import Outcome, completed, failed, retrying, throttled

StopReason = Literal["cancel", "shutdown", "lost", "suspend"]


class Execution:
    """A run executing in this worker; the heartbeat and cancel listener act on it."""

    __slots__ = (
        "attempt",
        "canceled",
        "done",
        "handed_over",
        "handing_over",
        "leased_at",
        "message",
        "queue",
        "run_id",
        "running_user_code",
        "started",
        "stop_reason",
        "task_id",
    )

    def __init__(
        self,
        run_id: str,
        attempt: int,
        task_id: str,
        queue: str,
        message: Any,
        claimed_at: float | None = None,
    ) -> None:
        self.run_id = run_id
        self.attempt = attempt
        self.task_id = task_id
        self.queue = queue
        self.message = message
        self.started = time.monotonic()
        # When the lease was last set, at the latest (monotonic): the claim's or the last
        # renewal's sending. The supervisor renews from then, whenever the reply came.
        self.leased_at = self.started if claimed_at is None else claimed_at
        self.handing_over = False
        self.handed_over = False
        self.done = False
        self.stop_reason: StopReason | None = None
        # The worker's task for this message while it is inside the task function: only
        # then may stop() cancel it.
        self.running_user_code: asyncio.Task[Any] | None = None
        self.canceled = False

    def stop(self, reason: StopReason) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        task = self.running_user_code
        # Stopped from inside the run (a checkpoint found the run lost): RunLost is already
        # on its way out of the task function, and a cancel would hit the worker after it.
        if task is not None and not self.canceled and task is not asyncio.current_task():
            self.canceled = True
            task.cancel()


async def run_attempt(
    task: Task[Any, Any], payload: bytes, ctx: RunContext, failures: int, execution: Execution
) -> Outcome:
    """Call the task function in the calling task (no task of its own per run: creating,
    scheduling and awaiting one cost about as much as the rest of a no-op run's Python
    work). The context variable is set in this task's context, which asyncio gave it as
    a copy of its creator's, so it is seen only by this run."""
    try:
        kwargs = task.decode_arguments(payload)
    except InvalidArguments as exc:
        return failed(exc)
    current = asyncio.current_task()
    assert current is not None
    set_context(ctx)
    timeout = asyncio.timeout(task.max_duration) if task.max_duration is not None else None
    execution.running_user_code = current
    try:
        if timeout is None:
            result = await task.fn(**kwargs)
        else:
            async with timeout:
                result = await task.fn(**kwargs)
    except asyncio.CancelledError:
        if not execution.canceled:
            raise
        return _stopped(execution.stop_reason or "cancel")
    except TimeoutError as exc:
        if timeout is not None and timeout.expired():
            error = TimeoutError(f"the attempt ran longer than max_duration={task.max_duration}s")
            error.__cause__ = exc
            return failed(error, RunStatus.TIMED_OUT)
        return _failure(task, exc, failures)
    except RunLost:
        return _stopped("lost")
    except ServiceUnavailable:
        raise  # Redis stayed away while a step waited to save its result: not the task's fault
    except NonRetryableError as exc:
        return failed(exc)
    except RateLimited as exc:
        return throttled(exc)
    except Exception as exc:
        if execution.stop_reason == "lost":  # the task function caught RunLost and went on
            return _stopped("lost")
        return _failure(task, exc, failures)
    finally:
        execution.running_user_code = None
        set_context(None)
        if execution.canceled:
            current.uncancel()  # the cancel was for the task function, not for the worker
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
    if reason == "suspend":
        return Outcome(run_status=RunStatus.WAITING, attempt_status="WAITING")
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
