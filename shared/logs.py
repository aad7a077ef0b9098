"""Log records written inside a task, kept per attempt in Redis for `conveyor runs logs`.

The worker installs a LogRecord factory once per process. While an attempt runs, its
AttemptLog sits in a context variable that the task's code (and every task or thread it
starts with a copy of its context) sees; each record created meanwhile, by any logger, is
stamped with the run id, attempt, task id and the current trace and span ids (when a span
is recording), and kept in memory. Kept records go to the run's list
`{ns}:{<run_id>}:logs` in batches: every FLUSH_RECORDS records, FLUSH_SECONDS after the
first of a batch, and at the end of the attempt (in the same write as its outcome). A
worker killed mid-attempt so loses at most its last FLUSH_SECONDS of records.

Writes are best-effort: logging never waits for Redis, and a write that fails loses its
batch (the worker says so in its own log) but never the run's outcome. An attempt keeps
at most MAX_RECORDS records and MAX_BYTES of them, each message cut at MAX_MESSAGE
characters; what it logged beyond that is counted and noted in a last record. The list
expires run_ttl (plus a margin) after its last write, as an ended run's keys do.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from opentelemetry import trace

from .store import RunStore

MAX_RECORDS = 1000
MAX_BYTES = 256 * 1024
MAX_MESSAGE = 8 * 1024
FLUSH_RECORDS = 100
FLUSH_SECONDS = 0.5
# The logs of an ended run outlive its run hash (which expires run_ttl after the end) a little.
TTL_MARGIN_S = 60

log = logging.getLogger("conveyor.worker")


class Stored(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """A record as kept in Redis (short field names: an attempt may keep a thousand)."""

    n: int  # attempt
    t: int  # epoch ms
    lv: str
    lg: str
    m: str
    tr: str = ""
    sp: str = ""
    # A note: this many records of the attempt were not kept.
    dr: int = 0


class LogEntry(msgspec.Struct, frozen=True):
    """A log record of a run, as `Client.get_logs` returns it."""

    run_id: str
    attempt: int
    time: datetime
    level: str
    logger: str
    message: str
    # The trace and span that were current (W3C hex ids), when one was recording.
    trace_id: str | None = None
    span_id: str | None = None
    # Set on the note that ends an attempt's records when some were not kept: how many.
    dropped: int = 0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Stored)
_formatter = logging.Formatter()
# Flushes and their callbacks run outside any attempt's context: what they log is not
# captured into the attempt they write for.
_outside = contextvars.Context()
# Records may come from threads a task started (asyncio.to_thread copies the context). One
# lock for all attempts: held for a few list operations, and none is made per attempt.
_lock = threading.Lock()


class RunLogs:
    """A worker's: makes the AttemptLog of each attempt it runs."""

    def __init__(self, store: RunStore) -> None:
        install()
        self.batcher = store.batcher
        self.keys = store.keys
        self.ttl_ms = (int(store.settings.run_ttl) + TTL_MARGIN_S) * 1000
        # The worker's loop and its thread, from its first attempt on.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = 0

    def attempt(self, run_id: str, attempt: int, task_id: str) -> AttemptLog:
        """Use with `with` around the attempt: records are captured inside it."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
            self.thread = threading.get_ident()
        return AttemptLog(self, self.loop, run_id, attempt, task_id)


class AttemptLog:
    """The records of one attempt, kept in memory and written in batches."""

    __slots__ = (
        "_bytes",
        "_closed",
        "_dropped",
        "_kept",
        "_loop",
        "_owner",
        "_pending",
        "_timer",
        "_token",
        "_unsaved",
        "attempt",
        "run_id",
        "task_id",
    )

    def __init__(
        self,
        owner: RunLogs,
        loop: asyncio.AbstractEventLoop,
        run_id: str,
        attempt: int,
        task_id: str,
    ) -> None:
        # Made for every attempt, logging or not: nothing here costs more than a store.
        self._owner = owner
        self._loop = loop
        self.run_id = run_id
        self.attempt = attempt
        self.task_id = task_id
        self._pending: list[bytes] = []
        self._kept = 0
        self._bytes = 0
        self._dropped = 0
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._token: contextvars.Token[AttemptLog | None] | None = None
        self._unsaved = 0

    def __enter__(self) -> AttemptLog:
        self._token = _current.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _current.reset(self._token)
        self.close()

    def add(self, record: logging.LogRecord) -> None:
        """Stamp a record created during the attempt and keep it, within the bounds."""
        record.conveyor_run_id = self.run_id
        record.conveyor_attempt = self.attempt
        record.conveyor_task_id = self.task_id
        span = trace.get_current_span().get_span_context()
        trace_id = span_id = ""
        if span.is_valid:
            trace_id, span_id = f"{span.trace_id:032x}", f"{span.span_id:016x}"
            record.conveyor_trace_id = trace_id
            record.conveyor_span_id = span_id
        if self._kept >= MAX_RECORDS:  # full: not worth formatting (the count is locked below)
            with _lock:
                if not self._closed:
                    self._dropped += 1
            return
        entry = _encoder.encode(
            Stored(
                self.attempt,
                int(record.created * 1000),
                record.levelname,
                record.name,
                _message(record),
                trace_id,
                span_id,
            )
        )
        with _lock:
            if self._closed:
                return
            if self._kept >= MAX_RECORDS or self._bytes + len(entry) > MAX_BYTES:
                self._dropped += 1
                return
            self._kept += 1
            self._bytes += len(entry)
            self._pending.append(entry)
            first, full = len(self._pending) == 1, len(self._pending) >= FLUSH_RECORDS
        if threading.get_ident() != self._owner.thread:
            if first or full:
                self._soon(self.flush if full else self._arm)
        elif full:
            self.flush()
        elif first:
            self._arm()

    def flush(self) -> None:
        """Send the kept records not sent yet, with the list's expiry, in one write (the
        batcher sends what is issued in one turn of the loop together); not awaited."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        with _lock:
            batch, self._pending = self._pending, []
        owner = self._owner
        key = owner.keys.logs(self.run_id)
        sent = [
            owner.batcher.call("RPUSH", key, *batch),
            owner.batcher.call("PEXPIRE", key, owner.ttl_ms),
        ]
        sent[0].add_done_callback(lambda f: self._written(f, len(batch)), context=_outside)
        sent[1].add_done_callback(_retrieve, context=_outside)

    def close(self) -> None:
        """End of the attempt: send the rest, with a note of what was not kept."""
        with _lock:
            if self._closed:
                return
            self._closed = True
            if self._dropped:
                note = Stored(
                    self.attempt,
                    int(time.time() * 1000),
                    "WARNING",
                    "conveyor",
                    f"{self._dropped} more records of this attempt were not kept (at most "
                    f"{MAX_RECORDS} records and {MAX_BYTES // 1024} KiB per attempt)",
                    dr=self._dropped,
                )
                self._pending.append(_encoder.encode(note))
        self.flush()

    def _arm(self) -> None:
        if self._timer is None and not self._closed:
            self._timer = self._loop.call_later(FLUSH_SECONDS, self.flush, context=_outside)

    def _soon(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the worker is gone
            self._loop.call_soon_threadsafe(callback, context=_outside)

    def _written(self, future: asyncio.Future[Any], records: int) -> None:
        error = future.exception() if not future.cancelled() else None
        if error is None and isinstance(future.result(), Exception):
            error = future.result()  # an error reply
        if error is not None:
            # Said once per attempt: Redis away, every batch of every attempt would say it.
            self._unsaved += records
            if self._unsaved == records:
                log.warning(
                    "run %s: log records of attempt %d are not saved (%d so far): %r",
                    self.run_id,
                    self.attempt,
                    records,
                    error,
                )


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _message(record: logging.LogRecord) -> str:
    """The record's message with its traceback, cut at MAX_MESSAGE characters. Never
    raises: logging must not fail the task."""
    try:
        text = record.getMessage()
    except Exception as exc:  # arguments that do not fit the format
        text = f"{record.msg!r} (cannot be formatted with {record.args!r}: {exc!r})"
    try:
        if record.exc_info:
            text = f"{text}\n{_formatter.formatException(record.exc_info)}"
        if record.stack_info:
            text = f"{text}\n{record.stack_info}"
    except Exception as exc:
        text = f"{text}\n(traceback cannot be formatted: {exc!r})"
    if len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE]}... ({len(text) - MAX_MESSAGE} characters cut)"
    return text


_current: contextvars.ContextVar[AttemptLog | None] = contextvars.ContextVar(
    "conveyor_attempt_log", default=None
)
_installed = False


def install() -> None:
    """Capture the records of attempts (idempotent). Outside attempts the factory costs
    one context variable look-up per record."""
    global _installed
    if _installed:
        return
    _installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        attempt = _current.get()
        if attempt is not None:
            with contextlib.suppress(Exception):  # never the task's problem
                attempt.add(record)
        return record

    logging.setLogRecordFactory(factory)


def decode(run_id: str, raws: list[bytes], attempt: int | None = None) -> list[LogEntry]:
    """The records of a run's list, by attempt (a stale attempt's late batch may follow
    a newer one's), in the order each attempt logged them."""
    entries = [
        LogEntry(
            run_id,
            s.n,
            datetime.fromtimestamp(s.t / 1000, UTC),
            s.lv,
            s.lg,
            s.m,
            s.tr or None,
            s.sp or None,
            s.dr,
        )
        for s in map(_decoder.decode, raws)
        if attempt is None or s.n == attempt
    ]
    entries.sort(key=lambda e: e.attempt)
    return entries
