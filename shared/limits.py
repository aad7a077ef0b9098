"""Rate limits and concurrency limits as tasks declare them.

A limit is shared by every task that declares it under the same name (a task's own limit
is named after the task). Workers evaluate them in Redis (shared/limiter.py), so a limit
holds across all workers of a namespace.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta

from .errors import TaskDefinitionError
from .names import check_name

_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_UNITS |= {"h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+?)s?\s*$")


class RateLimit:
    """At most `rate` starts per `per` seconds, with bursts of up to `burst` starts: over
    any window of T seconds, at most rate * T / per + burst runs start."""

    __slots__ = ("burst", "name", "per", "rate")

    def __init__(
        self,
        rate: float,
        *,
        per: float | timedelta = 1.0,
        burst: int | None = None,
        name: str | None = None,
    ) -> None:
        seconds = per.total_seconds() if isinstance(per, timedelta) else per
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0:
            raise TaskDefinitionError(
                f"a rate limit's rate must be a positive number, got {rate!r}"
            )
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
            raise TaskDefinitionError(f"a rate limit's period must be positive, got {per!r}")
        if burst is None:
            burst = max(1, math.floor(rate))
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise TaskDefinitionError(
                f"a rate limit's burst must be an integer >= 1, got {burst!r}"
            )
        if name is not None:
            _check("rate limit name", name)
        self.rate = float(rate)
        self.per = float(seconds)
        self.burst = burst
        self.name = name

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """'10/s', '100/min', '1000/h', '5/2s': a rate per period, bursting to the rate."""
        match = _RATE.match(text.lower())
        unit = _UNITS.get(match.group(3)) if match else None
        if match is None or unit is None:
            raise TaskDefinitionError(
                f"cannot read the rate limit {text!r}: write it as '10/s', '100/min', "
                "'1000/h' or '5/2s', or use RateLimit(rate, per=seconds, burst=n)"
            )
        return cls(float(match.group(1)), per=float(match.group(2) or 1) * unit)

    @property
    def interval_ms(self) -> float:
        """The time one start uses up."""
        return self.per * 1000 / self.rate

    def named(self, default: str) -> RateLimit:
        """This limit, or for a task's own (unnamed) limit a copy under the task's name."""
        if self.name:
            return self
        own = RateLimit(self.rate, per=self.per, burst=self.burst)
        own.name = default  # "task:<id>", a name users cannot declare
        return own

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RateLimit) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple[float, float, int, str | None]:
        return (self.rate, self.per, self.burst, self.name)

    def __repr__(self) -> str:
        name = f", name={self.name!r}" if self.name else ""
        return f"RateLimit({self.rate:g}, per={self.per:g}, burst={self.burst}{name})"


class Concurrency:
    """At most `limit` runs at once across all workers; with `per_key`, also at most that
    many per concurrency key (set on trigger), with keys served in turn."""

    __slots__ = ("limit", "name", "per_key")

    def __init__(self, limit: int, *, per_key: int | None = None, name: str | None = None) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise TaskDefinitionError(f"a concurrency limit must be an integer >= 1, got {limit!r}")
        if per_key is not None and (
            isinstance(per_key, bool) or not isinstance(per_key, int) or per_key < 1
        ):
            raise TaskDefinitionError(
                f"a per-key concurrency limit must be an integer >= 1, got {per_key!r}"
            )
        if name is not None:
            _check("concurrency limit name", name)
        self.limit = limit
        self.per_key = per_key
        self.name = name

    @property
    def key_limit(self) -> int:
        return self.per_key or self.limit

    def named(self, default: str) -> Concurrency:
        if self.name:
            return self
        own = Concurrency(self.limit, per_key=self.per_key)
        own.name = default
        return own

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Concurrency) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple[int, int | None, str | None]:
        return (self.limit, self.per_key, self.name)

    def __repr__(self) -> str:
        per_key = f", per_key={self.per_key}" if self.per_key else ""
        name = f", name={self.name!r}" if self.name else ""
        return f"Concurrency({self.limit}{per_key}{name})"


def _check(what: str, name: str) -> None:
    try:
        check_name(what, name)
    except Exception as exc:
        raise TaskDefinitionError(str(exc)) from exc
    if name.startswith("task:"):
        raise TaskDefinitionError(f"{what} {name!r}: names starting 'task:' are the tasks' own")


# Named limits declared in this process: one name, one definition.
_declared: dict[tuple[str, str], RateLimit | Concurrency] = {}


def declare(task_id: str, limit: RateLimit | Concurrency) -> None:
    """Refuse a second, different definition of a named limit."""
    assert limit.name is not None
    kind = "rate limit" if isinstance(limit, RateLimit) else "concurrency limit"
    seen = _declared.setdefault((kind, limit.name), limit)
    if seen != limit:
        raise TaskDefinitionError(
            f"task {task_id!r}: the {kind} {limit.name!r} is already declared as {seen!r}; "
            f"every task sharing it must declare it the same way, not as {limit!r}"
        )
