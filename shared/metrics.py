"""The metrics of workers and schedulers, through the OpenTelemetry metrics API only.

The instruments are made once, at import, from the global meter provider. Until the SDK
is installed (by the application or the worker and scheduler commands) they are the API's
proxies, which only look for a real instrument: a run costs a few such calls, well under
a microsecond each. Attributes are dicts made once per task (and outcome), not per call.

Every instrument has the attribute `conveyor.task.id` but the reaper's. The meaning of
each is in its description; the README ("Logs and metrics") lists them.
"""

from __future__ import annotations

import time

from opentelemetry import metrics

from .models import RunStatus

TASK = "conveyor.task.id"
RUN_STATUS = "conveyor.run.status"
ATTEMPT_STATUS = "conveyor.attempt.status"
THROTTLE_REASON = "conveyor.throttle.reason"

# Seconds: from a no-op run's milliseconds to hour-long runs and backlogs.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

_meter = metrics.get_meter("conveyor")

started = _meter.create_counter(
    "conveyor.runs.started",
    unit="{attempt}",
    description="Attempts started: first tries, retries, and resumes after a wait",
)
completed = _meter.create_counter(
    "conveyor.runs.completed", unit="{run}", description="Runs that ended COMPLETED"
)
failed = _meter.create_counter(
    "conveyor.runs.failed",
    unit="{run}",
    description="Runs that ended FAILED, TIMED_OUT or CRASHED (conveyor.run.status says which)",
)
retried = _meter.create_counter(
    "conveyor.runs.retried",
    unit="{attempt}",
    description="Attempts that failed with a retry due",
)
throttled = _meter.create_counter(
    "conveyor.runs.throttled",
    unit="{run}",
    description=(
        "Starts held back: by a rate limit (reason rate), a concurrency limit (concurrency),"
        " or a RateLimited raised by the task (downstream)"
    ),
)
inflight = _meter.create_up_down_counter(
    "conveyor.runs.inflight", unit="{run}", description="Attempts executing in this process"
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
steps_executed = _meter.create_counter(
    "conveyor.steps.executed",
    unit="{step}",
    description="Steps and waits that ran and saved their result",
)
steps_replayed = _meter.create_counter(
    "conveyor.steps.replayed",
    unit="{step}",
    description="Steps and waits that returned their saved result (a replay)",
)
ticks = _meter.create_counter(
    "conveyor.scheduler.ticks", unit="{tick}", description="Cron ticks fired by the leader"
)
republished = _meter.create_counter(
    "conveyor.reaper.republished",
    unit="{run}",
    description="Stranded runs the reaper published again",
)


class TaskMeter:
    """The instruments' calls for one task, with its attribute dicts made once."""

    __slots__ = ("_variants", "attributes")

    def __init__(self, task_id: str) -> None:
        self.attributes = {TASK: task_id}
        self._variants: dict[tuple[str, str], dict[str, str]] = {}

    def _with(self, name: str, value: str) -> dict[str, str]:
        """The task's attributes plus one, e.g. how an attempt ended."""
        attributes = self._variants.get((name, value))
        if attributes is None:
            attributes = self._variants[name, value] = {**self.attributes, name: value}
        return attributes

    def started(
        self, run_id: str, attempt: int, not_before: int | None, scheduled_at: int | None
    ) -> None:
        """An attempt starts; its queue wait is what the message says (see waited())."""
        started.add(1, self.attributes)
        inflight.add(1, self.attributes)
        wait = waited(run_id, attempt, not_before, scheduled_at, time.time())
        if wait is not None:
            queue_wait.record(wait, self.attributes)

    def ran(self, attempt_status: str, seconds: float, executed: int, replayed: int) -> None:
        """The task function returned (or raised): how long it ran, and its steps."""
        duration.record(seconds, self._with(ATTEMPT_STATUS, attempt_status))
        if executed:
            steps_executed.add(executed, self.attributes)
        if replayed:
            steps_replayed.add(replayed, self.attributes)

    def left(self) -> None:
        inflight.add(-1, self.attributes)

    def written(self, run_status: RunStatus, attempt_status: str) -> None:
        """The attempt's outcome is in Redis: count how the run goes on."""
        if run_status is RunStatus.COMPLETED:
            completed.add(1, self.attributes)
        elif run_status is RunStatus.RETRYING:
            if attempt_status == "THROTTLED":
                self.throttled("downstream")
            else:
                retried.add(1, self.attributes)
        elif run_status in (RunStatus.FAILED, RunStatus.TIMED_OUT, RunStatus.CRASHED):
            failed.add(1, self._with(RUN_STATUS, run_status.value))

    def throttled(self, reason: str) -> None:
        throttled.add(1, self._with(THROTTLE_REASON, reason))


_meters: dict[str, TaskMeter] = {}


def of(task_id: str) -> TaskMeter:
    meter = _meters.get(task_id)
    if meter is None:
        meter = _meters[task_id] = TaskMeter(task_id)
    return meter


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
