"""Rate limits, RateLimited pauses and concurrency limits, against the real services:
definitions, the Redis scripts on their own, then worker processes under each limit."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import timedelta
from typing import Any

import pytest

from conveyor import Client, Concurrency, RateLimit, RateLimited, RunStatus, Settings, task
from conveyor.shared.errors import TaskDefinitionError
from conveyor.shared.limiter import Limiter
from conveyor.shared.redis_client import redis_client
from conveyor.shared.store import RunStore
from tests import limit_tasks
from tests.conftest import eventually
from tests.limit_tasks import running_key, starts_key

# -- definitions --------------------------------------------------------------------------


def test_rate_limit_strings() -> None:
    assert RateLimit.parse("10/s") == RateLimit(10, per=1, burst=10)
    assert RateLimit.parse("100/min") == RateLimit(100, per=60, burst=100)
    assert RateLimit.parse("5 / 2s") == RateLimit(5, per=2, burst=5)
    assert RateLimit.parse("1000/hour") == RateLimit(1000, per=3600, burst=1000)
    assert RateLimit(0.5, per=timedelta(seconds=1)).burst == 1
    for bad in ("10", "ten/s", "10/fortnight", "/s", "-1/s"):
        with pytest.raises(TaskDefinitionError, match="cannot read the rate limit"):
            RateLimit.parse(bad)


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda: RateLimit(0), "rate must be a positive number"),
        (lambda: RateLimit(5, per=0), "period must be positive"),
        (lambda: RateLimit(5, burst=0), "burst must be an integer >= 1"),
        (lambda: RateLimit(5, name="bad name"), "rate limit name 'bad name' is not valid"),
        (lambda: RateLimit(5, name="task:x"), "names starting 'task:'"),
        (lambda: Concurrency(0), "concurrency limit must be an integer >= 1"),
        (lambda: Concurrency(3, per_key=0), "per-key concurrency limit"),
        (lambda: Concurrency(True), "concurrency limit must be an integer"),
    ],
)
def test_bad_limits_are_refused(make: Any, problem: str) -> None:
    with pytest.raises(TaskDefinitionError, match=problem):
        make()


def test_task_limit_options() -> None:
    async def fn() -> None: ...

    t = task(id="limits-defs-a", rate_limit="3/s", concurrency_limit=4)(fn)
    assert t.rate_limit is not None and t.concurrency is not None
    assert (t.rate_limit.rate, t.rate_limit.per, t.rate_limit.burst) == (3, 1, 3)
    assert t.rate_limit.name == t.concurrency.name == "task:limits-defs-a"
    assert t.concurrency.limit == 4
    with pytest.raises(TaskDefinitionError, match="rate_limit must be a string"):
        task(id="limits-defs-b", rate_limit=3)(fn)  # type: ignore[arg-type]
    with pytest.raises(TaskDefinitionError, match="concurrency_limit must be a number"):
        task(id="limits-defs-c", concurrency_limit="3")(fn)  # type: ignore[arg-type]
    # A named limit is shared, and must be declared the same way by every task.
    task(id="limits-defs-d", rate_limit=RateLimit(2, name="shared-api"))(fn)
    task(id="limits-defs-e", rate_limit=RateLimit(2, name="shared-api"))(fn)
    with pytest.raises(TaskDefinitionError, match="already declared as RateLimit"):
        task(id="limits-defs-f", rate_limit=RateLimit(9, name="shared-api"))(fn)


def test_retry_after_values() -> None:
    assert RateLimited(retry_after=3).retry_after == 3
    assert RateLimited(retry_after="7").retry_after == 7
    assert RateLimited(retry_after=timedelta(minutes=1)).retry_after == 60
    assert RateLimited().retry_after == RateLimited.DEFAULT_RETRY_AFTER
    assert RateLimited(retry_after="Wed, 21 Oct 2015 07:28:00 GMT").retry_after == 0
    assert RateLimited(retry_after=10**9).retry_after == RateLimited.MAX_RETRY_AFTER
    with pytest.raises(ValueError, match="neither seconds nor an HTTP date"):
        RateLimited(retry_after="soon")
    assert "retry after 3s" in str(RateLimited(retry_after=3))


async def test_bad_concurrency_key_is_refused(client: Client) -> None:
    from conveyor import InvalidOption

    with pytest.raises(InvalidOption, match="concurrency_key"):
        await limit_tasks.per_tenant.options(concurrency_key="").trigger(tenant="a", seconds=0)
    with pytest.raises(InvalidOption, match="line break"):
        await limit_tasks.per_tenant.options(concurrency_key="a\nb").trigger(tenant="a", seconds=0)


# -- the scripts on their own ---------------------------------------------------------------


@pytest.fixture
async def limiter(settings: Settings) -> Any:
    r = redis_client(settings)
    store = RunStore(r, settings)
    yield Limiter(store)
    await store.close()
    await r.aclose()


async def test_rate_take_reserves_in_order(limiter: Limiter) -> None:
    limit = RateLimit(10, per=1.0, burst=3, name="script-rate")
    answers = [await limiter.take_rate(limit, None) for _ in range(8)]
    assert [a.go for a in answers] == [True] * 3 + [False] * 5
    later = [a.at_ms - a.now_ms for a in answers[3:]]
    # One start every 100 ms after the burst, each reservation 100 ms after the one before.
    assert later == sorted(later)
    assert 50 <= later[0] <= 110 and 450 <= later[-1] <= 520
    # A reservation held is honoured without taking another start.
    held = answers[4]
    again = await limiter.take_rate(limit, f"{held.epoch}:{held.at_ms}")
    assert again.go
    # A pause voids reservations: the same one now reserves after the pause.
    until = await limiter.pause_rate(limit, 2000)
    after = await limiter.take_rate(limit, f"{held.epoch}:{held.at_ms}")
    assert not after.go and after.at_ms >= until and after.epoch != held.epoch


async def test_slots_park_wake_and_fairness(limiter: Limiter) -> None:
    limit = Concurrency(2, per_key=1, name="script-slots")
    take = limiter.take_slot
    assert (await take(limit, "a1", "w1", "A", "q", b"m-a1")).kind == "go"
    assert (await take(limit, "a2", "w1", "A", "q", b"m-a2")).kind == "parked"  # A at 1
    assert (await take(limit, "a3", "w1", "A", "q", b"m-a3")).kind == "parked"
    assert (await take(limit, "b1", "w1", "B", "q", b"m-b1")).kind == "go"
    assert (await take(limit, "b2", "w1", "B", "q", b"m-b2")).kind == "parked"
    # A second copy of a parked run's message keeps its place.
    assert (await take(limit, "a2", "w2", "A", "q", b"m-a2")).kind == "parked"
    # A slot held by another worker: that copy must come back later.
    held = await take(limit, "a1", "w2", "A", "q", b"m-a1")
    assert held.kind == "held" and held.wait_ms > 0
    # Released by a worker that does not hold it: nothing happens.
    assert await limiter.release_slot(limit, "a1", "w2") == []
    woken = await limiter.release_slot(limit, "a1", "w1")
    assert [(w.run_id, w.queue, w.message) for w in woken] == [("a2", "q", b"m-a2")]
    # The woken run takes the slot reserved for it.
    assert (await take(limit, "a2", "w3", "A", "q", b"m-a2")).kind == "go"
    assert [w.run_id for w in await limiter.release_slot(limit, "b1", "w1")] == ["b2"]
    assert [w.run_id for w in await limiter.release_slot(limit, "a2", "w3")] == ["a3"]
    assert await limiter.renew(limit, "w1", ["a3", "b2"]) == 0  # reserved, not taken yet


async def test_slots_of_a_dead_worker_free_and_lost_wakes_repeat(
    limiter: Limiter, settings: Settings
) -> None:
    limit = Concurrency(1, name="script-dead")
    assert (await limiter.take_slot(limit, "r1", "dead", "", "q", b"m1")).kind == "go"
    assert (await limiter.take_slot(limit, "r2", "w", "", "q", b"m2")).kind == "parked"
    assert await limiter.sweep(limit, "w") == []
    await asyncio.sleep(settings.lease_ttl + 0.1)
    # The dead worker's lease ran out: the sweep frees it and wakes r2...
    assert [w.run_id for w in await limiter.sweep(limit, "w")] == ["r2"]
    # ...whose message is lost: once its reservation runs out it is woken again.
    await asyncio.sleep(settings.lease_ttl + 0.1)
    assert [w.run_id for w in await limiter.sweep(limit, "w")] == ["r2"]
    assert (await limiter.take_slot(limit, "r2", "w", "", "q", b"m2")).kind == "go"
    assert await limiter.renew(limit, "w", ["r2"]) == 1


# -- worker processes -----------------------------------------------------------------------


async def _starts(settings: Settings, task_id: str) -> list[tuple[float, str, int]]:
    r = redis_client(settings)
    try:
        raw = await r.lrange(starts_key(settings.namespace, task_id), 0, -1)
    finally:
        await r.aclose()
    out = []
    for line in raw:
        at, run_id, attempt = line.decode().split()
        out.append((float(at), run_id, int(attempt)))
    return out


async def _all_done(client: Client, handles: list[Any], timeout: float) -> list[Any]:
    return await asyncio.wait_for(
        asyncio.gather(*(h.result(timeout=timeout) for h in handles)), timeout + 5
    )


async def test_rate_limit_across_two_workers(
    client: Client, settings: Settings, spawn_worker: Any
) -> None:
    """5/s with bursts of 5, 50 runs, two workers: no 1-s window has more than 10 starts,
    all complete, and throttled runs cost the workers almost no CPU."""
    workers = [spawn_worker("tests.limit_tasks") for _ in range(2)]
    handles = await limit_tasks.rate_limited.batch_trigger([{"i": i} for i in range(50)])
    # Throttled runs show why they wait.
    await asyncio.sleep(2)
    throttled = [await client.get_run(h.id) for h in handles[-5:]]
    assert all(r.status is RunStatus.QUEUED and r.throttled for r in throttled), throttled
    assert "rate limit of task 'lim-rate'" in (throttled[0].throttled or "")
    cpu_before = sum(w.cpu_seconds() for w in workers)
    await asyncio.sleep(4)
    cpu_throttled = sum(w.cpu_seconds() for w in workers) - cpu_before
    assert sorted(await _all_done(client, handles, 30)) == list(range(50))
    starts = sorted(at for at, _, _ in await _starts(settings, "lim-rate"))
    assert len(starts) == 50
    worst = max(sum(1 for s in starts if t <= s < t + 1.0) for t in starts)
    assert worst <= 10, f"{worst} starts in one second"
    # 50 runs at 5/s after a burst of 5 take about 9 s: the limit did the pacing.
    assert starts[-1] - starts[0] >= 8.0
    # Both workers, 4 s of waiting on the ladder: well under a tenth of a core.
    assert cpu_throttled < 0.8, f"{cpu_throttled:.2f}s of CPU while throttled"


async def test_rate_limited_pauses_the_limit_everywhere(
    client: Client, settings: Settings, spawn_worker: Any
) -> None:
    """RateLimited(retry_after=3) from one run: no run of the task starts on any worker
    for 3 s, and the run completes after it with its retry budget (1 attempt) intact."""
    spawn_worker("tests.limit_tasks")
    spawn_worker("tests.limit_tasks")
    first = await limit_tasks.calls_api.trigger(i=0, fail_first=True)
    await eventually(lambda: _starts(settings, "lim-429"), timeout=20)
    await asyncio.sleep(0.3)  # the pause is written before the attempt's outcome
    paused_at = time.time()
    others = await limit_tasks.calls_api.batch_trigger([{"i": i} for i in range(1, 11)])
    assert await first.result(timeout=30) == 0
    assert sorted(await _all_done(client, others, 30)) == list(range(1, 11))
    starts = await _starts(settings, "lim-429")
    later = [at for at, run_id, _ in starts if run_id != first.id]
    assert min(later) >= paused_at + 2.5, f"started {min(later) - paused_at:.2f}s into the pause"
    run = await client.get_run(first.id)
    assert [a.status for a in run.attempts] == ["THROTTLED", "COMPLETED"]
    assert "RateLimited" in (run.attempts[0].error or "")


async def test_concurrency_limit_across_workers_and_a_killed_worker(
    client: Client, settings: Settings, spawn_worker: Any
) -> None:
    """At most 3 at once over two workers; a SIGKILLed worker's slots free within the
    lease time and the runs it held are run again elsewhere."""
    a = spawn_worker("tests.limit_tasks", "--concurrency", "10")
    b = spawn_worker("tests.limit_tasks", "--concurrency", "10")
    handles = await limit_tasks.holds_a_slot.batch_trigger([{"seconds": 0.4}] * 15)
    await _all_done(client, handles, 60)
    r = redis_client(settings)
    try:
        seen = [
            int(x)
            for x in await r.lrange(running_key(settings.namespace, "lim-slots") + ":seen", 0, -1)
        ]
        assert len(seen) == 15 and max(seen) <= 3, seen
        assert max(seen) == 3  # the limit was the bound, not the workers
        await r.delete(running_key(settings.namespace, "lim-slots"))
    finally:
        await r.aclose()

    # Three long runs take every slot in worker C; C is SIGKILLed: its slots free
    # within the lease time, and a run parked meanwhile starts in worker D.
    for w in (a, b):
        w.kill()
        w.wait()
    c = spawn_worker("tests.limit_tasks", "--concurrency", "10")
    long_runs = await limit_tasks.holds_a_slot.batch_trigger([{"seconds": 30}] * 3)

    async def all_executing() -> bool:
        runs = [await client.get_run(h.id) for h in long_runs]
        return all(run.status is RunStatus.EXECUTING for run in runs)

    await eventually(all_executing, timeout=20)
    short = await limit_tasks.holds_a_slot.trigger(seconds=0)
    spawn_worker("tests.limit_tasks", "--concurrency", "10")
    await asyncio.sleep(2)
    parked = await client.get_run(short.id)
    assert parked.status is RunStatus.QUEUED and "3 of 3 running" in (parked.throttled or "")
    c.kill()
    killed_at = time.time()
    await short.result(timeout=30)
    started = [at for at, run_id, _ in await _starts(settings, "lim-slots") if run_id == short.id]
    # Slot leases are the lease_ttl (2 s), renewed and swept every sixth of it.
    assert started[0] - killed_at <= settings.lease_ttl * 1.5 + 0.5, started[0] - killed_at
    for h in long_runs:
        await client.cancel(h.id)


async def test_concurrency_keys_take_turns(
    client: Client, settings: Settings, spawn_worker: Any
) -> None:
    """Tenant A with 200 queued runs and tenant B with 5, per-key limit 2, total cap 3:
    all of B's runs start before A's 20th."""
    a_runs = await limit_tasks.per_tenant.options(concurrency_key="A").batch_trigger(
        [{"tenant": "A", "seconds": 0.2}] * 200
    )
    b_runs = await limit_tasks.per_tenant.options(concurrency_key="B").batch_trigger(
        [{"tenant": "B", "seconds": 0.2}] * 5
    )
    spawn_worker("tests.limit_tasks", "--concurrency", "50")
    spawn_worker("tests.limit_tasks", "--concurrency", "50")
    b_ids = {h.id for h in b_runs}
    a_ids = {h.id for h in a_runs}

    async def b_started() -> bool:
        return b_ids <= {run_id for _, run_id, _ in await _starts(settings, "lim-tenants")}

    await eventually(b_started, timeout=60)
    order = [run_id for _, run_id, _ in sorted(await _starts(settings, "lim-tenants"))]
    a_before_last_b = sum(
        1 for run_id in order[: max(order.index(i) for i in b_ids)] if run_id in a_ids
    )
    assert a_before_last_b < 19, f"{a_before_last_b} of A's runs started before B's last"
    run = await client.get_run(a_runs[-1].id)
    assert run.concurrency_key == "A"
    if run.status is RunStatus.QUEUED:
        assert "concurrency limit 'tenants'" in (run.throttled or "")
    for h in a_runs:
        await client.cancel(h.id)


async def test_cancel_throttled_runs(client: Client, settings: Settings, spawn_worker: Any) -> None:
    """A run waiting for a slot and a run waiting for its rate are canceled: neither ever
    runs, and the slot is not lost."""
    spawn_worker("tests.limit_tasks")
    holder = await limit_tasks.one_at_a_time.trigger(seconds=3)
    waiting = await limit_tasks.one_at_a_time.trigger(seconds=0)
    first = await limit_tasks.once_a_minute.trigger()
    deferred = await limit_tasks.once_a_minute.trigger()

    async def throttled() -> bool:
        runs = [await client.get_run(h.id) for h in (waiting, deferred)]
        return all(r.throttled for r in runs)

    await eventually(throttled, timeout=20)
    await first.result(timeout=20)
    assert "starts at" in ((await client.get_run(deferred.id)).throttled or "")
    assert "concurrency limit of task 'lim-one'" in (
        (await client.get_run(waiting.id)).throttled or ""
    )
    await client.cancel(waiting.id)
    await client.cancel(deferred.id)
    await holder.result(timeout=20)
    after = await limit_tasks.one_at_a_time.trigger(seconds=0)
    await after.result(timeout=20)
    ran = {run_id for _, run_id, _ in await _starts(settings, "lim-one")}
    assert waiting.id not in ran and after.id in ran
    assert (await client.get_run(waiting.id)).status is RunStatus.CANCELED
    assert (await client.get_run(deferred.id)).status is RunStatus.CANCELED
    assert deferred.id not in {run_id for _, run_id, _ in await _starts(settings, "lim-slow-rate")}


async def test_lost_slot_wakes_are_made_good(
    client: Client, settings: Settings, spawn_worker: Any
) -> None:
    """Every wake-up message of a parked run is lost (as if each waker died before its
    publish): the sweep wakes each again once its reserved slot's lease runs out."""
    from tests.faults import LOSE_SLOT_WAKES

    spawn_worker("tests.limit_tasks", "tests.faults", env={LOSE_SLOT_WAKES: "1"})
    handles = await limit_tasks.one_at_a_time.batch_trigger([{"seconds": 0}] * 4)
    await _all_done(client, handles, 60)
    starts = sorted(at for at, _, _ in await _starts(settings, "lim-one"))
    # After the first, each start waited out a lease (2 s) for its lost wake-up.
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) == 4 and all(g >= settings.lease_ttl * 0.8 for g in gaps), gaps


async def test_a_pause_ends_at_the_steady_rate(limiter: Limiter) -> None:
    """After a RateLimited pause the limit does not burst: the downstream just pushed back."""
    limit = RateLimit(10, per=1.0, burst=5, name="script-pause")
    until = await limiter.pause_rate(limit, 500)
    answers = [await limiter.take_rate(limit, None) for _ in range(4)]
    assert not any(a.go for a in answers)
    ats = [a.at_ms for a in answers]
    assert ats[0] == until and [b - a for a, b in itertools.pairwise(ats)] == [100, 100, 100]
