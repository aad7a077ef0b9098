"""The one exception hierarchy of conveyor.

ConveyorError
├── ConfigurationError        a setting is missing or invalid
│   └── InvalidSchedule       a cron expression, time zone, interval or schedule key is bad
├── TaskDefinitionError       a @task or @step cannot be used as written
├── TriggerError              a run could not be triggered
│   ├── InvalidArguments      arguments do not match the task's signature
│   ├── PayloadTooLarge       the encoded arguments exceed the payload limit
│   ├── InvalidOption         a trigger option (delay, tags, idempotency_key) is out of bounds
│   ├── PublishFailed         the broker did not accept the message
│   └── TriggerIncomplete     the run was not both recorded and published in time
├── ServiceUnavailable        Redis or RabbitMQ stayed unavailable for as long as work may wait
├── RunLost                   this attempt no longer owns its run (taken over or ended)
├── RunNotFound               no run with that id (never existed or expired)
├── ScheduleNotFound          no schedule with that key
├── InvalidListing            a runs listing's cursor or limit cannot be used (also a ValueError)
├── RunFailed                 a run ended in a terminal state other than COMPLETED
├── ResultTimeout             a run did not finish within the wait (also a TimeoutError)
├── RateLimited               raised by task code: the downstream said 429; pause and retry
└── NonRetryableError         raised by task code: fail the run now, no retries
    └── StepResultNotSerializable
"""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime, timedelta


class ConveyorError(Exception):
    """Base of every error conveyor raises."""


class ConfigurationError(ConveyorError):
    pass


class InvalidSchedule(ConfigurationError):
    """A schedule cannot be used as declared; `field` names the part to fix (expression,
    timezone, every, key)."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"invalid schedule {field}: {detail}")
        self.field = field
        self.detail = detail


class ScheduleNotFound(ConveyorError):
    def __init__(self, key: str) -> None:
        super().__init__(f"no schedule {key!r} in this namespace")
        self.key = key


class TaskDefinitionError(ConveyorError):
    pass


class TriggerError(ConveyorError):
    pass


class InvalidArguments(TriggerError):
    def __init__(self, task_id: str, detail: str) -> None:
        super().__init__(f"invalid arguments for task {task_id!r}: {detail}")
        self.task_id = task_id
        self.detail = detail


class PayloadTooLarge(TriggerError):
    def __init__(self, task_id: str, size: int, limit: int) -> None:
        super().__init__(
            f"payload of task {task_id!r} is {size} bytes, over the limit of {limit} bytes; "
            "pass a reference (a URL or object key) instead of the data, "
            "or raise CONVEYOR_MAX_PAYLOAD_BYTES"
        )
        self.task_id = task_id
        self.size = size
        self.limit = limit


class InvalidOption(TriggerError):
    """A trigger option is out of its bounds (shared/bounds.py); `field` names it."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"invalid trigger option {field}: {detail}")
        self.field = field
        self.detail = detail


class PublishFailed(TriggerError):
    """The broker did not take the message. `unknown`: it may have (its confirm did not
    come in time, or the connection was lost after it was sent)."""

    def __init__(self, message: str, *, unknown: bool = False) -> None:
        super().__init__(message)
        self.unknown = unknown


class TriggerIncomplete(TriggerError):
    """`trigger` could not both record its runs in Redis and get their messages confirmed
    within `publish_timeout`, so it returns no handle. `published` says whether the runs
    may still start: True, the messages are in RabbitMQ and the runs will start (the
    worker that takes a message records its run); False, they were not published and
    will not start; None, the broker never confirmed them, so they may or may not."""

    def __init__(self, run_ids: list[str], published: bool | None, detail: str) -> None:
        runs = f"run {run_ids[0]}" if len(run_ids) == 1 else f"runs {', '.join(run_ids)}"
        if published:
            outcome = (
                "published, but Redis did not record it; it will still start: the worker "
                "that takes its message records it"
            )
        elif published is None:
            outcome = (
                "not confirmed by RabbitMQ, so it may or may not start; look it up by its id "
                "later (it stays QUEUED until its message arrives or is republished)"
            )
        else:
            outcome = "not published; it will not start"
        super().__init__(f"{runs}: {outcome} ({detail})")
        self.run_ids = run_ids
        self.run_id = run_ids[0]
        self.published = published


class ServiceUnavailable(ConveyorError):
    pass


class RunLost(ConveyorError):
    """Raised in a stale attempt: another worker took the run over (this one stalled past
    its lease) or the run ended (canceled). The attempt stops and writes nothing."""

    def __init__(self, run_id: str, status: str) -> None:
        super().__init__(f"run {run_id} is no longer this attempt's (now {status}); stopping")
        self.run_id = run_id
        self.status = status


class RunNotFound(ConveyorError):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run {run_id!r} in this namespace (wrong id, or it expired)")
        self.run_id = run_id


class RunFailed(ConveyorError):
    """The run ended FAILED, CRASHED, TIMED_OUT, CANCELED or EXPIRED; `error` says why."""

    def __init__(self, run_id: str, status: str, error: str | None) -> None:
        super().__init__(f"run {run_id} ended {status}: {error or 'no error recorded'}")
        self.run_id = run_id
        self.status = status
        self.error = error


class ResultTimeout(ConveyorError, TimeoutError):
    """`status`: the run's last status read ('unknown' if none was); `unavailable`: why
    Redis did not answer the last read, if it did not."""

    def __init__(
        self, run_id: str, timeout: float, status: str, unavailable: str | None = None
    ) -> None:
        message = f"run {run_id} did not finish within {timeout}s (status {status})"
        if unavailable is not None:
            message += f"; Redis did not answer the last read: {unavailable}"
        super().__init__(message)
        self.run_id = run_id
        self.status = status
        self.unavailable = unavailable


class InvalidListing(ConveyorError, ValueError):
    """A `list_runs` argument cannot be used; `field` names it (cursor, limit)."""

    def __init__(self, field: str, value: object, detail: str) -> None:
        super().__init__(f"invalid {field} {value!r}: {detail}")
        self.field = field
        self.value = value


class InvalidWait(ConveyorError, ValueError):
    """A sleep or wait asked for something that cannot be waited for."""


class TokenTimeout(ConveyorError, TimeoutError):
    """Raised in a task by wait_for_token when the token was not completed in time."""

    def __init__(self, token_id: str) -> None:
        super().__init__(f"token {token_id} was not completed before its timeout")
        self.token_id = token_id


class TokenNotFound(ConveyorError):
    def __init__(self, token_id: str) -> None:
        super().__init__(f"no token {token_id!r} in this namespace (wrong id, or it expired)")
        self.token_id = token_id


class TokenNotPending(ConveyorError):
    """A token can be completed once, and only before its timeout."""

    def __init__(self, token_id: str, status: str) -> None:
        what = "was completed already" if status == "COMPLETED" else "timed out"
        super().__init__(f"token {token_id} {what}: it cannot be completed again")
        self.token_id = token_id
        self.status = status


class NonRetryableError(ConveyorError):
    """Raise from task code to fail the run at once, skipping the remaining retries."""


class RateLimited(ConveyorError):
    """Raise from task code when a downstream service says to slow down (HTTP 429). The
    task's rate limit pauses for every worker for `retry_after` seconds, and the run is
    tried again after it without using up a retry attempt.

    `retry_after`: seconds, a timedelta, or an HTTP Retry-After header value (seconds or
    an HTTP date); None waits DEFAULT_RETRY_AFTER seconds."""

    DEFAULT_RETRY_AFTER = 1.0
    # A Retry-After further ahead than this is taken for a mistake and capped.
    MAX_RETRY_AFTER = 24 * 3600.0

    def __init__(self, retry_after: float | timedelta | str | None = None) -> None:
        self.retry_after = _retry_after(retry_after, self.DEFAULT_RETRY_AFTER, self.MAX_RETRY_AFTER)
        super().__init__(f"rate limited downstream: retry after {self.retry_after:g}s")


def _retry_after(value: float | timedelta | str | None, default: float, cap: float) -> float:
    if value is None:
        return default
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(text)
            except (TypeError, ValueError):
                raise ValueError(
                    f"Retry-After {value!r} is neither seconds nor an HTTP date"
                ) from None
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            seconds = (when - datetime.now(UTC)).total_seconds()
    else:
        raise TypeError(f"retry_after must be seconds, a timedelta or a string, got {value!r}")
    if seconds != seconds:  # NaN
        raise ValueError("retry_after must be a number of seconds, got NaN")
    return min(max(seconds, 0.0), cap)


class StepResultNotSerializable(NonRetryableError):
    def __init__(self, step_key: str, detail: str) -> None:
        super().__init__(
            f"the result of step {step_key!r} cannot be checkpointed: {detail}; "
            "return JSON-compatible data, msgspec Structs, dataclasses, datetimes or bytes"
        )
        self.step_key = step_key


def describe(exc: BaseException) -> str:
    """`TypeName: message`, for logs and stored errors."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
