"""Log records written inside tasks: kept per attempt in Redis, bounded, read back by
`Client.get_logs` and `conveyor runs logs`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conveyor import Client, LogEntry, RunNotFound, Settings
from conveyor.shared import logs
from conveyor.worker import Worker
from tests import log_tasks
from tests.conftest import eventually
from tests.faults import pid_of, wait_for_consumers
from tests.test_cli import conveyor


@pytest.fixture
async def log_worker(settings: Settings, client: Client) -> AsyncIterator[Worker]:
    w = Worker(log_tasks.ALL, settings=settings, concurrency=10)
    await w.start()
    yield w
    await w.shutdown()


def _lines(entries: list[LogEntry]) -> list[tuple[int, str, str, str]]:
    return [(e.attempt, e.level, e.logger, e.message.splitlines()[0]) for e in entries]


async def test_each_attempt_keeps_its_records(
    settings: Settings, client: Client, log_worker: Worker
) -> None:
    handle = await log_tasks.chatty.trigger()
    assert await handle.result(timeout=20) == "ok"
    entries = await client.get_logs(handle.id)
    assert _lines(entries) == [
        (1, "INFO", "tests.chatty", "greeting once"),
        (1, "DEBUG", "tests.chatty", "debug on attempt 1"),
        (1, "INFO", "tests.chatty", "info on attempt 1"),
        (1, "WARNING", "tests.other", "from a thread on attempt 1"),
        (1, "ERROR", "tests.other", "failing attempt 1"),
        # The step's checkpoint holds on the retry: it does not run (or log) again.
        (2, "DEBUG", "tests.chatty", "debug on attempt 2"),
        (2, "INFO", "tests.chatty", "info on attempt 2"),
        (2, "WARNING", "tests.other", "from a thread on attempt 2"),
    ]
    assert {e.run_id for e in entries} == {handle.id}
    failing = entries[4]
    assert "Traceback" in failing.message and "RuntimeError: first attempt fails" in failing.message
    # No SDK here: no span records, so records carry no trace ids.
    assert all(e.trace_id is None and e.span_id is None for e in entries)
    assert [e.attempt for e in await client.get_logs(handle.id, attempt=2)] == [2, 2, 2]
    assert await client.get_logs(handle.id, attempt=3) == []

    human = await conveyor(settings, "runs", "logs", handle.id)
    assert human.code == 0, human.err
    lines = human.out.splitlines()
    assert lines[0] == f"run {handle.id}"
    assert "attempt 1  INFO     tests.chatty: info on attempt 1" in lines[3]
    assert "attempt 2  WARNING  tests.other: from a thread on attempt 2" in lines[-1]
    one = (await conveyor(settings, "runs", "logs", handle.id, "--attempt", "2", "--json")).json()
    assert [(r["run_id"], r["attempt"], r["level"]) for r in one] == [
        (handle.id, 2, "DEBUG"),
        (handle.id, 2, "INFO"),
        (handle.id, 2, "WARNING"),
    ]
    assert {"time", "logger", "message", "trace_id", "span_id", "dropped"} <= set(one[0])
    none = await conveyor(settings, "runs", "logs", handle.id, "--attempt", "5")
    assert none.out == f"no logs for attempt 5 of run {handle.id}"
    missing = await conveyor(settings, "runs", "logs", "run_nosuchrun")
    assert missing.code == 1 and "run_nosuchrun" in missing.err
    with pytest.raises(RunNotFound):
        await client.get_logs("run_nosuchrun")


async def test_records_carry_the_run_for_any_handler(
    client: Client, log_worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tests.chatty")
    handle = await log_tasks.metered_ok.trigger()
    await handle.result(timeout=20)
    [record] = [r for r in caplog.records if r.getMessage() == "greeting once"]
    assert (record.conveyor_run_id, record.conveyor_attempt, record.conveyor_task_id) == (
        handle.id,
        1,
        "metered-ok",
    )
    outside = logging.getLogger("tests.chatty").makeRecord("x", logging.INFO, "", 0, "m", (), None)
    assert not hasattr(outside, "conveyor_run_id")


@pytest.mark.parametrize(
    ("lines", "width", "kept"),
    [
        (5000, 50, logs.MAX_RECORDS),  # the count bound
        (1000, 2000, None),  # the size bound
    ],
)
async def test_an_attempt_keeps_at_most_the_bounds(
    client: Client, log_worker: Worker, lines: int, width: int, kept: int | None
) -> None:
    handle = await log_tasks.flood.trigger(lines=lines, width=width)
    assert await handle.result(timeout=30) == lines
    entries = await client.get_logs(handle.id)
    *records, note = entries
    if kept is not None:
        assert len(records) == kept
    assert len(records) < lines
    size = sum(len(logs._encoder.encode(_stored(e))) for e in records)
    assert size <= logs.MAX_BYTES
    assert [int(r.message.split()[1]) for r in records] == list(range(len(records)))
    assert note.dropped == lines - len(records)
    assert note.level == "WARNING" and f"{lines - len(records)} more records" in note.message


async def test_a_long_message_is_cut(client: Client, log_worker: Worker) -> None:
    handle = await log_tasks.flood.trigger(lines=1, width=50_000)
    await handle.result(timeout=20)
    [entry] = await client.get_logs(handle.id)
    assert len(entry.message) < logs.MAX_MESSAGE + 100
    assert entry.message.endswith("characters cut)")


def _stored(e: LogEntry) -> logs.Stored:
    return logs.Stored(e.attempt, int(e.time.timestamp() * 1000), e.level, e.logger, e.message)


async def test_records_flushed_before_a_sigkill_are_kept(
    client: Client, settings: Settings, spawn_worker: Any
) -> None:
    workers = [spawn_worker("tests.log_tasks"), spawn_worker("tests.log_tasks")]
    await wait_for_consumers(settings, "log-and-hang", 2)
    handle = await log_tasks.log_and_hang.trigger(seconds=60)

    async def flushed() -> list[LogEntry]:
        return await client.get_logs(handle.id)

    # Sent FLUSH_SECONDS after it was logged, while the attempt still runs.
    [first] = await eventually(flushed, timeout=20)
    assert (first.attempt, first.message) == (1, "started attempt 1")
    run = await client.get_run(handle.id)
    [victim] = [w for w in workers if w.proc.pid == pid_of(run.attempts[-1].worker)]
    victim.kill()
    await asyncio.to_thread(victim.wait, 10)

    assert await handle.result(timeout=30) == "done"
    assert _lines(await client.get_logs(handle.id)) == [
        (1, "INFO", "tests.chatty", "started attempt 1"),
        (2, "INFO", "tests.chatty", "started attempt 2"),
        (2, "INFO", "tests.chatty", "done on attempt 2"),
    ]


async def test_a_failed_write_loses_records_not_the_run(
    client: Client, log_worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    handle = await log_tasks.unlogged.trigger()
    assert await handle.result(timeout=20) == "done"
    await eventually(
        lambda: _said(caplog, f"run {handle.id}: log records of attempt 1 are not saved")
    )


async def _said(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


async def test_the_logs_expire_with_the_run(
    settings: Settings, client: Client, log_worker: Worker
) -> None:
    handle = await log_tasks.metered_ok.trigger()
    await handle.result(timeout=20)
    ttl = await client.redis.pttl(client.store.keys.logs(handle.id))
    assert 0 < ttl <= (settings.run_ttl + logs.TTL_MARGIN_S) * 1000
    assert ttl > settings.run_ttl * 1000 - 60_000
