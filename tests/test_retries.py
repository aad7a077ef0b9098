"""Retries with backoff through the delay ladder (issue item 3)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import msgspec
import pytest
import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from conveyor import Client, Retry, RunFailed, RunStatus, TaskDefinitionError
from conveyor.broker.delay import (
    LEVELS,
    MAX_UNITS,
    UNIT_MS,
    delay_routing_key,
    delivery_binding,
    entry_level,
    level_bindings,
)
from conveyor.broker.topology import Names
from conveyor.shared.models import Run, RunMessage
from conveyor.shared.redis_client import redis_client
from conveyor.worker import Worker
from tests import tasks
from tests.conftest import eventually

# -- Retry.delay --------------------------------------------------------------------------


def test_delay_follows_the_policy_without_jitter() -> None:
    policy = Retry(max_attempts=9, factor=2.0, min_delay=0.5, max_delay=10.0, jitter=False)
    assert [policy.delay(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    flat = Retry(factor=1.0, min_delay=3.0, max_delay=3.0, jitter=False)
    assert [flat.delay(n) for n in (1, 2, 5)] == [3.0, 3.0, 3.0]


def test_jitter_draws_from_zero_to_the_base_delay() -> None:
    policy = Retry(factor=3.0, min_delay=1.0, max_delay=5.0, jitter=True)
    for attempt, base in [(1, 1.0), (2, 3.0), (3, 5.0), (9, 5.0)]:
        samples = [policy.delay(attempt) for _ in range(500)]
        assert all(0 <= s <= base for s in samples)
        # Full jitter spreads over the whole range, not just near the base.
        assert min(samples) < base * 0.2 and max(samples) > base * 0.8


def test_retry_defaults_and_validation() -> None:
    assert Retry() == Retry(max_attempts=3, factor=2.0, min_delay=1.0, max_delay=60.0, jitter=True)
    with pytest.raises(TaskDefinitionError, match="max_attempts"):
        Retry(max_attempts=0)
    with pytest.raises(TaskDefinitionError, match="factor"):
        Retry(factor=0.5)
    with pytest.raises(TaskDefinitionError, match="min_delay"):
        Retry(min_delay=5.0, max_delay=1.0)


# -- the delay ladder's routing keys ------------------------------------------------------


def _topic_match(pattern: str, key: str) -> bool:
    """AMQP topic matching: `*` is exactly one word, `#` zero or more."""

    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and p[0] in ("*", k[0]) and match(p[1:], k[1:])

    return match(pattern.split("."), key.split("."))


def _walk_ladder(routing_key: str, queue: str) -> tuple[list[int], bool]:
    """Follow a routing key from the ladder's entry exchange as the broker would:
    returns the levels whose queue it waits in, and whether it reaches the work queue."""
    waits: list[int] = []
    for level in reversed(range(LEVELS)):
        to_queue, onwards = level_bindings(level)
        into, past = _topic_match(to_queue, routing_key), _topic_match(onwards, routing_key)
        assert into != past, f"level {level} must route {routing_key!r} exactly one way"
        if into:
            waits.append(level)
    return waits, _topic_match(delivery_binding(queue), routing_key)


@pytest.mark.parametrize(
    ("delay_ms", "units"),
    [
        (0, 1),  # never zero: a deferred message always leaves the work queue for a while
        (1, 1),
        (100, 1),
        (101, 2),  # rounds up, so a message never arrives before it is due
        (700, 7),
        (1500, 15),
        (60_000, 600),
        (UNIT_MS * MAX_UNITS, MAX_UNITS),
        (UNIT_MS * MAX_UNITS + 1, MAX_UNITS),  # the cap: longer delays go round again
        (10**12, MAX_UNITS),
    ],
)
def test_delay_routing_key_bits(delay_ms: int, units: int) -> None:
    key = delay_routing_key(delay_ms, "video")
    words = key.split(".")
    assert len(words) == LEVELS + 1 and words[-1] == "video"
    assert int("".join(words[:LEVELS]), 2) == units
    waits, delivered = _walk_ladder(key, "video")
    assert delivered
    assert sum(UNIT_MS * 2**level for level in waits) == units * UNIT_MS
    # One hop per set bit, longest first.
    assert len(waits) == bin(units).count("1") and waits == sorted(waits, reverse=True)
    # Published to the first level it waits in: the levels above would only pass it on.
    assert entry_level(delay_ms) == waits[0]


def test_delay_routing_key_keeps_dotted_queue_names() -> None:
    key = delay_routing_key(300, "media.video")
    assert key.endswith(".media.video")
    assert _walk_ladder(key, "media.video") == ([1, 0], True)
    assert not _walk_ladder(key, "media")[1] and not _walk_ladder(key, "video")[1]


def test_level_bindings() -> None:
    top = LEVELS - 1
    assert level_bindings(top) == ("1.#", "0.#")
    assert level_bindings(0) == ("*." * top + "1.#", "*." * top + "0.#")
    assert delivery_binding("q") == "*." * LEVELS + "q"


# -- retries against the real broker -------------------------------------------------------


def _delays(run: Run) -> list[float]:
    """Seconds between the end of each attempt and the start of the next."""
    gaps = []
    for before, after in zip(run.attempts, run.attempts[1:], strict=False):
        assert before.finished_at is not None
        gaps.append((after.started_at - before.finished_at).total_seconds())
    return gaps


def _within(observed: float, expected: float) -> bool:
    """Never earlier than the policy (the ladder rounds delays up); later only by what a
    loaded machine may add, so a wrong factor or floor still fails."""
    return expected - 0.05 <= observed <= 2 * expected + 1.0


@pytest.fixture
async def ladder_copies(client: Client) -> AsyncIterator[AbstractQueue]:
    """A queue of our own bound where the delay ladder delivers retries of `ladder`: it
    gets a copy of every message the ladder hands back to that task's work queue."""
    await client.connect()
    connection = await aio_pika.connect(client.settings.amqp_url)
    channel = await connection.channel()
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(Names(client.settings.namespace).delay_deliver, delivery_binding("ladder"))
    yield queue
    await connection.close()


async def _drain(queue: AbstractQueue) -> list[AbstractIncomingMessage]:
    got = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        got.append(message)
    return got


async def test_backoff_delays_follow_the_policy(
    client: Client, worker: Worker, ladder_copies: AbstractQueue
) -> None:
    handle = await tasks.ladder.trigger(succeed_on=4)
    seen = set()
    deadline = asyncio.get_running_loop().time() + 20
    while not (status := await handle.status()).is_terminal:
        seen.add(status)
        assert asyncio.get_running_loop().time() < deadline, seen
        await asyncio.sleep(0.05)
    assert await handle.result(timeout=1) == 4
    assert RunStatus.RETRYING in seen
    run = await client.get_run(handle.id)
    assert [a.status for a in run.attempts] == ["FAILED", "FAILED", "FAILED", "COMPLETED"]
    assert [a.error for a in run.attempts[:3]] == [
        f"RuntimeError: attempt {n} fails" for n in (1, 2, 3)
    ]
    expected = [0.7, 1.5, 1.5]  # min(1.5, 0.7 * (15/7)**(n-1)): three and four hops, capped
    observed = _delays(run)
    assert all(o >= e for o, e in zip(observed, expected, strict=True)), observed
    assert all(_within(o, e) for o, e in zip(observed, expected, strict=True)), observed

    # Each retry came back through the ladder as a fresh message: its x-death lists just
    # the tiers of its own delay, once each. Nothing from an earlier pass is carried, so
    # RabbitMQ's dead-letter cycle detection can never drop a retry.
    copies = await _drain(ladder_copies)
    assert len(copies) == 3
    names = Names(client.settings.namespace)
    for copy, (delay, levels) in zip(
        copies, [(0.7, {2, 1, 0}), (1.5, {3, 2, 1, 0}), (1.5, {3, 2, 1, 0})], strict=True
    ):
        assert msgspec.json.decode(copy.body, type=RunMessage).id == handle.id
        deaths: list[Any] = list((copy.headers or {}).get("x-death") or [])
        assert {d["queue"] for d in deaths} == {names.delay_level(lv) for lv in levels}, delay
        assert all(d["count"] == 1 and d["reason"] == "expired" for d in deaths)


async def test_jittered_delays_stay_within_the_base(client: Client, worker: Worker) -> None:
    handle = await tasks.jittery.trigger(succeed_on=3)
    assert await handle.result(timeout=15) == 3
    run = await client.get_run(handle.id)
    observed = _delays(run)
    assert len(observed) == 2
    for gap, base in zip(observed, [0.5, 1.0], strict=True):
        assert 0 <= gap <= base * 1.2 + 0.5, observed  # full jitter: at most the base


async def test_non_retryable_error_fails_at_once(
    client: Client, worker: Worker, r: aioredis.Redis
) -> None:
    handle = await tasks.fatal.trigger()
    with pytest.raises(RunFailed) as info:
        await handle.result(timeout=10)
    assert info.value.status == "FAILED"
    assert info.value.error == "NonRetryableError: this cannot work"
    run = await client.get_run(handle.id)
    assert [a.status for a in run.attempts] == ["FAILED"]
    assert await r.lrange(tasks.trace_key(handle.id), 0, -1) == [b"fatal@1"]


async def test_failed_after_max_attempts_with_the_last_error(
    client: Client, worker: Worker, r: aioredis.Redis
) -> None:
    handle = await tasks.always_fails.trigger()
    with pytest.raises(RunFailed) as info:
        await handle.result(timeout=10)
    assert info.value.status == "FAILED"
    assert info.value.error == "RuntimeError: attempt 3 fails"
    run = await client.get_run(handle.id)
    assert run.status is RunStatus.FAILED
    assert run.error == "RuntimeError: attempt 3 fails"
    assert [(a.number, a.status, a.error) for a in run.attempts] == [
        (n, "FAILED", f"RuntimeError: attempt {n} fails") for n in (1, 2, 3)
    ]
    for attempt in run.attempts:
        assert attempt.traceback is not None and "in always_fails" in attempt.traceback
    assert run.finished_at == run.attempts[-1].finished_at
    assert await r.lrange(tasks.trace_key(handle.id), 0, -1) == [
        b"always-fails@1",
        b"always-fails@2",
        b"always-fails@3",
    ]
    # Nothing is left to run: no further attempt appears.
    await asyncio.sleep(0.5)
    assert len((await client.get_run(handle.id)).attempts) == 3


@pytest.fixture
async def r(client: Client) -> AsyncIterator[aioredis.Redis]:
    conn = redis_client(client.settings)
    yield conn
    await conn.aclose()


async def test_retrying_run_waits_in_the_broker_not_in_a_worker(
    client: Client, worker: Worker
) -> None:
    handle = await tasks.ladder.trigger(succeed_on=2)

    async def retrying() -> bool:
        return await handle.status() is RunStatus.RETRYING

    await eventually(retrying, timeout=10)

    async def let_go() -> bool:
        return handle.id not in worker.inflight

    # While the run waits for its retry (0.7 s), the worker holds neither the run nor its
    # message: the retry waits in the broker's delay ladder.
    await eventually(let_go, timeout=1)
    assert await handle.status() is RunStatus.RETRYING
    assert await handle.result(timeout=10) == 2
