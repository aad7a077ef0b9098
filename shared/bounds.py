"""Bounds on what a trigger carries: `trigger` refuses what is over them and the worker
dead-letters a wire message over them, both through the checks here."""

from __future__ import annotations

from collections.abc import Sequence

MAX_TAGS = 64
MAX_TAG_CHARS = 256
# The key is part of a Redis key name.
MAX_IDEMPOTENCY_KEY_CHARS = 256
# A concurrency key is stored beside each of its runs in the limit's hash slot.
MAX_CONCURRENCY_KEY_CHARS = 256
# Further ahead than this is taken for a mistake (seconds for milliseconds, a far future
# sentinel): such a run would go round the delay ladder for years.
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
