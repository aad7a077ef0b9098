"""Cron schedules as declared: `Cron` checks an expression and time zone when it is made,
and says when a schedule fires next. Expressions are parsed and stepped by croniter; the
rules here are only the ones conveyor adds on top:

- five fields, or six with seconds first ("*/10 * * * * *": every 10 seconds);
- `every=` fires at whole multiples of the interval since the Unix epoch, so every
  replica computes the same instants with no stored anchor;
- a local wall-clock time fires at most once: in a repeated hour (DST ends) a time
  already passed is not fired again, and a time in a gap (DST starts) fires once, at the
  first instant after the gap (croniter's choice).
"""

from __future__ import annotations

import time
from dataclasses import KW_ONLY, dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from .errors import ConfigurationError, InvalidSchedule
from .names import check_name

# Fire times tried while skipping a repeated hour before giving up (a repeated hour of an
# every-second schedule is 3,600 of them).
MAX_SKIPPED = 4000
MIN_EVERY = timedelta(seconds=1)


@dataclass(frozen=True)
class Cron:
    """One schedule of a task: a cron `expression` in `timezone`, or an `every` interval.

    `payload` holds the task's keyword arguments for each run; `key` names the schedule
    (default for one a task declares: `{task_id}:{n}`, see scheduler/declared.py).
    Checked when made: a bad expression or unknown zone raises InvalidSchedule."""

    expression: str | None = None
    _: KW_ONLY
    timezone: str = "UTC"
    every: timedelta | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    key: str | None = None

    def __post_init__(self) -> None:
        spec(self.expression, self.timezone, self.every)
        if self.key is not None:
            check_key(self.key)


class Spec:
    """A checked schedule that steps from one fire time (epoch ms) to the next."""

    __slots__ = ("every_ms", "expression", "zone")

    def __init__(self, expression: str | None, zone: ZoneInfo, every_ms: int) -> None:
        self.expression = expression
        self.zone = zone
        self.every_ms = every_ms

    def next_after(self, ms: int) -> int:
        """The first fire time strictly after `ms` (epoch milliseconds)."""
        if self.every_ms:
            return (ms // self.every_ms + 1) * self.every_ms
        assert self.expression is not None
        start = datetime.fromtimestamp(ms / 1000, self.zone)
        it = croniter(
            self.expression, start, ret_type=datetime, second_at_beginning=_has_seconds(self)
        )
        wall = start.replace(tzinfo=None)
        for _ in range(MAX_SKIPPED):
            fire: datetime = it.get_next(datetime)
            at = int(fire.timestamp() * 1000)
            # A repeated hour gives local times already passed a second instant: skipped.
            if at > ms and fire.replace(tzinfo=None) > wall:
                return at
        raise InvalidSchedule(
            "expression", f"{self.expression!r} finds no fire time after {start.isoformat()}"
        )


def _has_seconds(s: Spec) -> bool:
    return s.expression is not None and len(s.expression.split()) == 6


def spec(expression: str | None, timezone: str, every: timedelta | float | None) -> Spec:
    """Check a schedule as declared; raises InvalidSchedule naming what is wrong."""
    if (expression is None) == (every is None):
        raise InvalidSchedule(
            "expression", "give either a cron expression or every=, not both or neither"
        )
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise InvalidSchedule(
            "timezone", f"unknown time zone {timezone!r}; use an IANA name such as 'Europe/Paris'"
        ) from exc
    if every is not None:
        interval = every if isinstance(every, timedelta) else timedelta(seconds=every)
        if interval < MIN_EVERY or interval % timedelta(milliseconds=1):
            raise InvalidSchedule(
                "every", f"must be at least 1 second, in whole milliseconds, got {interval}"
            )
        if timezone != "UTC":
            raise InvalidSchedule("timezone", "every= intervals do not depend on a time zone")
        return Spec(None, zone, interval // timedelta(milliseconds=1))
    if not isinstance(expression, str) or len(expression.split()) not in (5, 6):
        raise InvalidSchedule(
            "expression",
            f"{expression!r} is not a cron expression: give 5 fields (minute hour day month "
            "weekday), or 6 with seconds first",
        )
    s = Spec(expression, zone, 0)
    try:
        croniter(expression, second_at_beginning=_has_seconds(s))
        # One step finds expressions that can never fire (30 February).
        s.next_after(int(time.time() * 1000))
    except (CroniterError, ValueError, KeyError) as exc:
        raise InvalidSchedule("expression", f"{expression!r} is not valid: {exc}") from exc
    return s


# The key goes into run ids (`cron:{key}:{fire_ms}`), which are at most 200 characters.
MAX_KEY_CHARS = 160


def check_key(key: str) -> str:
    try:
        check_name("schedule key", key)
    except ConfigurationError as exc:
        raise InvalidSchedule("key", str(exc)) from exc
    if len(key) > MAX_KEY_CHARS:
        raise InvalidSchedule("key", f"at most {MAX_KEY_CHARS} characters, got {len(key)}")
    return key


def tick_run_id(key: str, fire_ms: int) -> str:
    """The run of one tick: the same for every scheduler that fires it, so it is one run."""
    return f"cron:{key}:{fire_ms}"
