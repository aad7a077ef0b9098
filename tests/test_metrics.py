"""The worker's metrics, read with the SDK's in-memory reader from an in-process worker.

The global meter provider can be set once per process: the first test here sets it, and
each test compares what the instruments hold before and after its runs."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta

import msgspec
import pytest
from opentelemetry import metrics as otel
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from conveyor import Client, RunFailed, Settings
from conveyor.scheduler.reaper import Reaper
from conveyor.shared import metrics
from conveyor.shared.ids import new_run_id
from conveyor.shared.schedules import make_record
from conveyor.shared.store import NewRun
from conveyor.worker import Worker
from tests import log_tasks
from tests.test_schedules import Leader, put_due

_reader: list[InMemoryMetricReader] = []


def reader() -> InMemoryMetricReader:
    if not _reader:
        _reader.append(InMemoryMetricReader())
        otel.set_meter_provider(MeterProvider(metric_readers=_reader))
    return _reader[0]


Key = tuple[str, frozenset[tuple[str, str]]]


def snapshot() -> tuple[Counter[Key], Counter[Key], dict[Key, float]]:
    """Sums of counters, counts and totals of histograms, by metric and attributes."""
    sums: Counter[Key] = Counter()
    counts: Counter[Key] = Counter()
    totals: dict[Key, float] = {}
    data = reader().get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    key = (metric.name, frozenset((point.attributes or {}).items()))
                    if isinstance(point, HistogramDataPoint):
                        counts[key] += point.count
                        totals[key] = totals.get(key, 0.0) + point.sum
                    else:
                        sums[key] += int(point.value)
    return sums, counts, totals


def task_of(task_id: str, **more: str) -> frozenset[tuple[str, str]]:
    return frozenset(
        {metrics.TASK: task_id, **{f"conveyor.{k}": v for k, v in more.items()}}.items()
    )


@pytest.fixture
async def metered_worker(settings: Settings, client: Client) -> AsyncIterator[Worker]:
    reader()
    w = Worker(log_tasks.ALL, settings=settings, concurrency=10)
    await w.start()
    yield w
    await w.shutdown()


async def test_runs_and_attempts_are_counted(client: Client, metered_worker: Worker) -> None:
    sums0, counts0, totals0 = snapshot()
    ok = [await log_tasks.metered_ok.trigger() for _ in range(3)]
    flaky = await log_tasks.chatty.trigger()
    bad = await log_tasks.metered_fail.trigger()
    assert await asyncio.gather(*(h.result(timeout=20) for h in ok)) == [1, 1, 1]
    assert await flaky.result(timeout=20) == "ok"
    with pytest.raises(RunFailed):
        await bad.result(timeout=20)
    await asyncio.sleep(0.1)  # the last run's counts follow its outcome's write
    sums1, counts1, totals1 = snapshot()
    sums, counts = sums1 - sums0, counts1 - counts0

    def total(name: str, attributes: frozenset[tuple[str, str]]) -> int:
        return sums[(name, attributes)]

    ok_, chatty, fail = task_of("metered-ok"), task_of("chatty"), task_of("metered-fail")
    assert total("conveyor.runs.started", ok_) == 3
    assert total("conveyor.runs.started", chatty) == 2
    assert total("conveyor.runs.started", fail) == 1
    assert total("conveyor.runs.completed", ok_) == 3
    assert total("conveyor.runs.completed", chatty) == 1
    assert total("conveyor.runs.retried", chatty) == 1
    assert total("conveyor.runs.failed", task_of("metered-fail", **{"run.status": "FAILED"})) == 1
    assert total("conveyor.runs.completed", fail) == 0
    # Every attempt has left: nothing is in flight.
    for attributes in (ok_, chatty, fail):
        assert (sums1[("conveyor.runs.inflight", attributes)]) == 0
    # The step ran on the flaky run's first attempt and was replayed on its second.
    assert total("conveyor.steps.executed", ok_) == 3
    assert total("conveyor.steps.executed", chatty) == 1
    assert total("conveyor.steps.replayed", chatty) == 1

    def durations(task_id: str, status: str) -> int:
        return counts[("conveyor.run.duration", task_of(task_id, **{"attempt.status": status}))]

    assert durations("metered-ok", "COMPLETED") == 3
    assert durations("chatty", "FAILED") == 1
    assert durations("chatty", "COMPLETED") == 1
    assert durations("metered-fail", "FAILED") == 1
    key = ("conveyor.run.duration", task_of("chatty", **{"attempt.status": "FAILED"}))
    spent = totals1[key] - totals0.get(key, 0.0)
    assert 0 < spent < 20
    # Measured for first attempts and for the retry (from its backoff's end).
    assert counts[("conveyor.run.queue_wait", ok_)] == 3
    assert counts[("conveyor.run.queue_wait", chatty)] == 2
    waited = totals1[("conveyor.run.queue_wait", ok_)] - totals0.get(
        ("conveyor.run.queue_wait", ok_), 0.0
    )
    assert 0 <= waited < 3 * 20


async def test_throttled_starts_are_counted_by_reason(
    client: Client, metered_worker: Worker
) -> None:
    sums0, _, _ = snapshot()
    handles = [await log_tasks.metered_rate.trigger() for _ in range(3)]
    handles += [await log_tasks.metered_slot.trigger() for _ in range(3)]
    await asyncio.gather(*(h.result(timeout=20) for h in handles))
    sums = snapshot()[0] - sums0
    rate = ("conveyor.runs.throttled", task_of("metered-rate", **{"throttle.reason": "rate"}))
    slot = (
        "conveyor.runs.throttled",
        task_of("metered-slot", **{"throttle.reason": "concurrency"}),
    )
    assert sums[rate] >= 2  # a burst of one: the second and third wait for their turns
    assert sums[slot] >= 1


def test_queue_wait_is_measured_from_what_the_message_says() -> None:
    created = 1_700_000_000_000
    run_id = f"run_{created:012x}{'0' * 20}"
    assert metrics.created_ms(run_id) == created
    assert metrics.waited(run_id, 1, None, None, created / 1000 + 1.5) == 1.5
    # A delay or a retry backoff: from its end, not from the creation.
    assert metrics.waited(run_id, 2, created + 1000, None, created / 1000 + 1.5) == 0.5
    # A resume or a redelivery says nothing of when it could start.
    assert metrics.waited(run_id, 2, None, None, created / 1000 + 9) is None
    # A cron tick's run (its id is the schedule's), and an id of a producer's own.
    assert metrics.waited("cron:k:1", 1, None, created, created / 1000 + 2) == 2
    assert metrics.waited("mine-42", 1, None, None, 0) is None
    # Clocks a little apart never give a negative wait.
    assert metrics.waited(run_id, 1, None, None, created / 1000 - 1) == 0


async def test_cron_ticks_and_reaper_republishes_are_counted(
    settings: Settings, client: Client
) -> None:
    sums0, _, _ = snapshot()
    settings = msgspec.structs.replace(settings, reap_after=0.2)
    async with Leader(settings) as leader:
        now = await leader.ticker.now_ms()
        record = make_record("ticked", None, every=timedelta(seconds=1))
        await put_due(leader, "metered", record, (now - 2500) // 1000 * 1000)
        await leader.ticker.tick()
        fired = leader.ticker.fired
        # A run created and never published: the reaper publishes it.
        lost = NewRun(new_run_id(), "ticked", "ticked", b"{}", [], None, 0)
        await client.store.create([lost])
        await asyncio.sleep(0.4)
        republished = await Reaper(leader.runtime, leader.lease).reap()
    sums = snapshot()[0] - sums0
    assert fired >= 3
    assert sums[("conveyor.scheduler.ticks", task_of("ticked"))] == fired
    assert republished >= 1
    assert sums[("conveyor.reaper.republished", frozenset())] == republished
