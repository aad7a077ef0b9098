"""msgspec models: the wire message, the stored run and what the API returns."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

import msgspec


class RunStatus(enum.StrEnum):
    QUEUED = "QUEUED"
    DELAYED = "DELAYED"
    EXECUTING = "EXECUTING"
    WAITING = "WAITING"
    RETRYING = "RETRYING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    CRASHED = "CRASHED"
    TIMED_OUT = "TIMED_OUT"
    EXPIRED = "EXPIRED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset(
    {
        RunStatus.COMPLETED,
        RunStatus.FAILED,
        RunStatus.CANCELED,
        RunStatus.CRASHED,
        RunStatus.TIMED_OUT,
        RunStatus.EXPIRED,
    }
)


class RunMessage(msgspec.Struct, omit_defaults=True):
    """The body of every message on a work queue (see docs/wire-format.md).

    New fields must get defaults so that older and newer producers stay compatible.
    """

    task: str
    payload: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"{}"))
    id: str | None = None
    idempotency_key: str | None = None
    tags: list[str] = msgspec.field(default_factory=list)
    # Epoch milliseconds before which the run must not start; set for delays and retries.
    not_before: int | None = None
    # Epoch milliseconds of the cron tick that made this run (scheduler/cron.py).
    scheduled_at: int | None = None
    # Counts the run under this key of its task's per-key concurrency limit.
    concurrency_key: str | None = None
    # A start reserved from the task's rate limit ("epoch:ms", shared/limiter.py), set by
    # the worker that deferred the run to that time.
    reserved: str | None = None
    # Milliseconds the run may wait to start (docs/wire-format.md); for a run the worker
    # creates from this message.
    ttl: int | None = None


class Attempt(msgspec.Struct, omit_defaults=True):
    """One execution of a run as its hash keeps it (field `a:{n}`, written by the
    scripts): number, status, start and end in epoch ms, error and traceback. The names
    are short so that a finished attempt's record stays within Redis's compact hash
    encoding (values of at most 64 bytes, `hash-max-listpack-value`); the worker is in a
    field of its own (`w:{n}`). Records written before kept the long names, and the
    worker inside: a record read takes the short name where both are there."""

    n: int | None = None
    s: str | None = None
    t0: int | None = None
    t1: int | None = None
    e: str | None = None
    tb: str | None = None
    number: int = 0
    status: str = ""
    started_at: int = 0
    finished_at: int | None = None
    error: str | None = None
    traceback: str | None = None
    worker: str = ""


class AttemptInfo(msgspec.Struct, frozen=True):
    number: int
    status: str
    started_at: datetime
    finished_at: datetime | None
    error: str | None
    traceback: str | None
    worker: str


class Run(msgspec.Struct, frozen=True):
    """A run as `Client.get_run` returns it."""

    id: str
    task_id: str
    status: RunStatus
    attempts: list[AttemptInfo]
    payload: dict[str, Any]
    output: Any
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    tags: list[str]
    idempotency_key: str | None
    queue: str
    steps: list[str]
    # A child run's parent and the root of its tree (None for a run nobody triggered),
    # and the runs this one triggered, in order.
    parent: str | None = None
    root: str | None = None
    children: list[str] = msgspec.field(default_factory=list)
    # The cron tick's time, for a run a schedule made.
    scheduled_at: datetime | None = None
    concurrency_key: str | None = None
    # Why a QUEUED run has not started: the rate or concurrency limit it waits for.
    throttled: str | None = None
    # A run with a ttl: it ends EXPIRED if no attempt has started by then.
    expires_at: datetime | None = None


class RunPage(msgspec.Struct, frozen=True):
    """A page of `Client.list_runs`: runs newest first, and the cursor of the next page
    (None when no older run is left to look at)."""

    runs: list[Run]
    cursor: str | None
