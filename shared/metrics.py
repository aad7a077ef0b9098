"""The metrics of workers and schedulers, through the OpenTelemetry metrics API only.

The instruments are made once, at import, from the global meter provider; until the SDK
is installed they are the API's proxies and record nothing. The counts of the hot path
are plain integers of a TaskMeter per task, which observable instruments report when a
reader collects (in the reader's thread: Python ints read whole), so a run adds to them
at the cost of an attribute increment; only the two histograms are called per run.
Attribute dicts are made once per task and outcome, never per call.

Every instrument has the attribute `conveyor.task.id` but the reaper's. The meaning of
each is in its description; the README ("Logs and metrics") lists them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from .models import RunStatus

TASK = "conveyor.task.id"
RUN_STATUS = "conveyor.run.status"
ATTEMPT_STATUS = "conveyor.attempt.status"
THROTTLE_REASON = "conveyor.throttle.reason"

# Seconds: from a no-op run's milliseconds to hour-long runs and backlogs.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class TaskMeter:
    """One task's counts (read by the observable instruments) and histogram calls."""

    __slots__ = (
        "_variants",
        "attributes",
        "completed",
        "executed",
        "failed",
        "inflight",
        "replayed",
        "retried",
        "started",
        "throttled",
    )

    def __init__(self, task_id: str) -> None:
        self.attributes = {TASK: task_id}
        self._variants: dict[tuple[str, str], dict[str, str]] = {}
        self.started = self.completed = self.retried = self.inflight = 0
        self.executed = self.replayed = 0
        # By run status and by throttle reason.
        self.failed: dict[str, int] = {}
        self.throttled: dict[str, int] = {}

    def with_(self, name: str, value: str) -> dict[str, str]:
        """The task's attributes plus one, e.g. how an attempt ended."""
        attributes = self._variants.get((name, value))
        if attributes is None:
            attributes = self._variants[name, value] = {**self.attributes, name: value}
        return attributes

    def attempt_started(
        self, run_id: str, attempt: int, not_before: int | None, scheduled_at: int | None
    ) -> None:
        """An attempt starts; its queue wait is what the message says (see waited())."""
        self.started += 1
        self.inflight += 1
        wait = waited(run_id, attempt, not_before, scheduled_at, time.time())
        if wait is not None:
            queue_wait.record(wait, self.attributes)

    def attempt_ran(
        self, attempt_status: str, seconds: float, executed: int, replayed: int
    ) -> None:
        """The task function returned (or raised): how long it ran, and its steps."""
        duration.record(seconds, self.with_(ATTEMPT_STATUS, attempt_status))
        self.executed += executed
        self.replayed += replayed

    def attempt_left(self) -> None:
        self.inflight -= 1

    def outcome_written(self, run_status: RunStatus, attempt_status: str) -> None:
        """The attempt's outcome is in Redis: count how the run goes on."""
        if run_status is RunStatus.COMPLETED:
            self.completed += 1
        elif run_status is RunStatus.RETRYING:
            if attempt_status == "THROTTLED":
                self.run_throttled("downstream")
            else:
                self.retried += 1
        elif run_status in (RunStatus.FAILED, RunStatus.TIMED_OUT, RunStatus.CRASHED):
            self.failed[run_status.value] = self.failed.get(run_status.value, 0) + 1

    def run_throttled(self, reason: str) -> None:
        self.throttled[reason] = self.throttled.get(reason, 0) + 1


_meters: dict[str, TaskMeter] = {}


def of(task_id: str) -> TaskMeter:
    meter = _meters.get(task_id)
    if meter is None:
        meter = _meters[task_id] = TaskMeter(task_id)
    return meter


Callback = Callable[[CallbackOptions], Iterable[Observation]]


def _each(count: Callable[[TaskMeter], int]) -> Callback:
    """Reports one count of every task."""

    def observe(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(count(m), m.attributes) for m in list(_meters.values())]

    return observe


def _by(counts: Callable[[TaskMeter], dict[str, int]], name: str) -> Callback:
    """Reports a count of every task by one more attribute."""

    def observe(_: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, m.with_(name, value))
            for m in list(_meters.values())
            for value, n in list(counts(m).items())
        ]

    return observe


_meter = metrics.get_meter("conveyor")

_meter.create_observable_counter(
    "conveyor.runs.started",
    [_each(lambda m: m.started)],
    unit="{attempt}",
    description="Attempts started: first tries, retries, and resumes after a wait",
)
_meter.create_observable_counter(
    "conveyor.runs.completed",
    [_each(lambda m: m.completed)],
    unit="{run}",
    description="Runs that ended COMPLETED",
)
_meter.create_observable_counter(
    "conveyor.runs.failed",
    [_by(lambda m: m.failed, RUN_STATUS)],
    unit="{run}",
    description="Runs that ended FAILED, TIMED_OUT or CRASHED (conveyor.run.status says which)",
)
_meter.create_observable_counter(
    "conveyor.runs.retried",
    [_each(lambda m: m.retried)],
    unit="{attempt}",
    description="Attempts that failed with a retry due",
)
_meter.create_observable_counter(
    "conveyor.runs.throttled",
    [_by(lambda m: m.throttled, THROTTLE_REASON)],
    unit="{run}",
    description=(
        "Starts held back: by a rate limit (reason rate), a concurrency limit (concurrency),"
        " or a RateLimited raised by the task (downstream)"
    ),
)
_meter.create_observable_up_down_counter(
    "conveyor.runs.inflight",
    [_each(lambda m: m.inflight)],
    unit="{run}",
    description="Attempts executing in this process",
)
_meter.create_observable_counter(
    "conveyor.steps.executed",
    [_each(lambda m: m.executed)],
    unit="{step}",
    description="Steps and waits that ran and saved their result",
)
_meter.create_observable_counter(
    "conveyor.steps.replayed",
    [_each(lambda m: m.replayed)],
    unit="{step}",
    description="Steps and waits that returned their saved result (a replay)",
)
duration = _meter.create_histogram(
    "conveyor.run.duration",
    unit="s",
    description="How long an attempt ran, by how it ended (conveyor.attempt.status)",
    explicit_bucket_boundaries_advisory=_BUCKETS,
)
queue_wait = _meter.create_histogram(
    "conveyor.run.queue_wait",
    unit="s",
    description=(
        "From the time a run could start (created, or its delay or retry backoff over) to"
        " the start of its attempt; resumes after a wait are not measured"
    ),
    explicit_bucket_boundaries_advisory=_BUCKETS,
)
# The scheduler's: a few calls per pass, not per run.
ticks = _meter.create_counter(
    "conveyor.scheduler.ticks", unit="{tick}", description="Cron ticks fired by the leader"
)
republished = _meter.create_counter(
    "conveyor.reaper.republished",
    unit="{run}",
    description="Stranded runs the reaper published again",
)


def waited(
    run_id: str, attempt: int, not_before: int | None, scheduled_at: int | None, now: float
) -> float | None:
    """Seconds from when the run could start to `now` (epoch seconds), or None when the
    message does not say. A run could start when it was created (the time in a
    conveyor run id, on the triggering host's clock, or a cron tick's time) or, later,
    when the message's not_before passed (a delay or a retry backoff, on Redis's clock).
    A later attempt without a not_before is a resume or a redelivery: its message is
    older than the time it could start, so it is not measured."""
    due = None
    if attempt == 1 or not_before is not None:
        due = created_ms(run_id) or scheduled_at
    if not_before is not None:
        due = not_before if due is None else max(due, not_before)
    if due is None:
        return None
    return max(0.0, now - due / 1000)


def created_ms(run_id: str) -> int | None:
    """The creation time of a run id that shared/ids.py made (run_ + 12 hex digits of
    epoch ms + noise); None for other ids (a wire-format producer may choose its own)."""
    head = run_id[4:16]
    if run_id[:4] != "run_" or len(head) != 12:
        return None
    try:
        return int(head, 16)
    except ValueError:
        return None
