"""Retry policy: exponential backoff with optional full jitter."""

from __future__ import annotations

import random

import msgspec

from .errors import TaskDefinitionError


class Retry(msgspec.Struct, frozen=True, kw_only=True):
    """Attempt n (counting from 1) that failed waits min(max_delay, min_delay * factor**(n-1))
    seconds before the next one; with jitter, a uniformly random part of that (full jitter)."""

    max_attempts: int = 3
    factor: float = 2.0
    min_delay: float = 1.0
    max_delay: float = 60.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise TaskDefinitionError(
                f"Retry.max_attempts must be at least 1, got {self.max_attempts}"
            )
        if self.factor < 1:
            raise TaskDefinitionError(f"Retry.factor must be at least 1, got {self.factor}")
        if self.min_delay < 0 or self.max_delay < self.min_delay:
            raise TaskDefinitionError(
                f"Retry delays must satisfy 0 <= min_delay <= max_delay, "
                f"got min_delay={self.min_delay}, max_delay={self.max_delay}"
            )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt`."""
        base = min(self.max_delay, self.min_delay * self.factor ** (attempt - 1))
        return random.uniform(0, base) if self.jitter else base


DEFAULT_RETRY = Retry()
