"""Bounds on what a trigger carries: `trigger` refuses what is over them and the worker
dead-letters a wire message over them, both through the checks here."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

MAX_TAGS = 64
MAX_TAG_CHARS = 256
# The key is part of a Redis key name.
MAX_IDEMPOTENCY_KEY_CHARS = 256
# A concurrency key is stored beside each of its runs in the limit's hash slot.
MAX_CONCURRENCY_KEY_CHARS = 256
# Further ahead than this is taken for a mistake (seconds for milliseconds, a far future
# sentinel): such a run would go round the delay ladder for years. A ttl has the same bound.
MAX_DELAY_MS = 366 * 24 * 3600 * 1000


def options_problem(
    idempotency_key: str | None, tags: Sequence[str], concurrency_key: str | None = None
) -> tuple[str, str] | None:
    """(field, what is wrong) for the first of these over its bound, else None."""
    if concurrency_key is not None:
        if not 1 <= len(concurrency_key) <= MAX_CONCURRENCY_KEY_CHARS:
            return (
                "concurrency_key",
                f"must be 1 to {MAX_CONCURRENCY_KEY_CHARS} characters, got {len(concurrency_key)}",
            )
        if "\n" in concurrency_key:
            return "concurrency_key", "must not contain a line break"
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        return (
            "idempotency_key",
            f"must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters, got {len(idempotency_key)}",
        )
    if len(tags) > MAX_TAGS:
        return "tags", f"at most {MAX_TAGS} tags, got {len(tags)}"
    for tag in tags:
        if len(tag) > MAX_TAG_CHARS:
            return "tags", f"a tag is at most {MAX_TAG_CHARS} characters, got {len(tag)}"
    return None


def not_before_problem(not_before: int, now_ms: int) -> str | None:
    """What is wrong with a message's `not_before` (epoch milliseconds), if anything."""
    if not_before < 0:
        return f"not_before {not_before} is negative; it is epoch milliseconds"
    if not_before - now_ms > MAX_DELAY_MS:
        return (
            f"not_before {not_before} is more than {MAX_DELAY_MS // 86_400_000} days ahead "
            "(it is epoch milliseconds)"
        )
    return None


def ttl_ms(ttl: object) -> tuple[int | None, str | None]:
    """A run's ttl (seconds, or a timedelta; None: no ttl) in milliseconds, or what is
    wrong with it."""
    if ttl is None:
        return None, None
    seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else ttl
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return None, f"must be seconds (a number) or a timedelta, got {ttl!r}"
    if not 0 < seconds <= MAX_DELAY_MS / 1000:
        return None, f"must be more than 0 and at most {MAX_DELAY_MS // 1000} seconds, got {ttl!r}"
    return max(1, int(seconds * 1000)), None


def wire_ttl_problem(ttl: int) -> str | None:
    """What is wrong with a message's `ttl` (milliseconds), if anything."""
    if not 0 < ttl <= MAX_DELAY_MS:
        return f"ttl {ttl} must be 1 to {MAX_DELAY_MS} (it is milliseconds)"
    return None
