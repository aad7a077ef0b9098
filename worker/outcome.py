"""How an attempt ended, decided from what the task function did."""

from __future__ import annotations

import traceback as tb

import msgspec

from conveyor.shared.errors import RateLimited, describe
from conveyor.shared.models import RunStatus


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    run_status: RunStatus
    attempt_status: str
    output: bytes = b""
    error: str = ""
    traceback: str = ""
    retry_delay_ms: int = 0
    # True when the message goes back to the queue instead of being acked (shutdown).
    requeue: bool = False


def completed(output: bytes) -> Outcome:
    return Outcome(run_status=RunStatus.COMPLETED, attempt_status="COMPLETED", output=output)


def failed(exc: BaseException, status: RunStatus = RunStatus.FAILED) -> Outcome:
    return Outcome(
        run_status=status,
        attempt_status=status.value,
        error=describe(exc),
        traceback="".join(tb.format_exception(exc)),
    )


def throttled(exc: RateLimited) -> Outcome:
    """Tried again after the downstream's Retry-After, without using up an attempt
    (finish.lua does not count a THROTTLED attempt as a failure)."""
    return Outcome(
        run_status=RunStatus.RETRYING,
        attempt_status="THROTTLED",
        error=describe(exc),
        retry_delay_ms=max(1, int(exc.retry_after * 1000)),
    )


def retrying(exc: BaseException, delay_s: float) -> Outcome:
    return Outcome(
        run_status=RunStatus.RETRYING,
        attempt_status="FAILED",
        error=describe(exc),
        traceback="".join(tb.format_exception(exc)),
        retry_delay_ms=max(0, int(delay_s * 1000)),
    )
