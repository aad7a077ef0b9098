"""What the cron tests read back: the runs a schedule made, each checked to have run once."""

from __future__ import annotations

import itertools
from typing import Any

from conveyor import Client, RunStatus, Settings
from conveyor.shared.redis_client import redis_client
from tests.conftest import eventually
from tests.faults import trace


async def tick_runs(settings: Settings, key: str) -> dict[int, str]:
    """Scheduled time (epoch ms) -> run id, for every run of schedule `key`."""
    r = redis_client(settings)
    try:
        found = [
            k.decode().split("{", 1)[1].rsplit("}", 1)[0]
            async for k in r.scan_iter(match=f"{settings.namespace}:{{cron:{key}:*}}:run")
        ]
    finally:
        await r.aclose()
    return {int(run_id.rsplit(":", 1)[1]): run_id for run_id in found}


async def each_tick_ran_once(
    client: Client, settings: Settings, key: str, step_ms: int
) -> list[int]:
    """Every run of `key` completed once with its own scheduled time as output, and the
    scheduled times are contiguous (no tick skipped). Returns them, in order."""
    runs = await tick_runs(settings, key)
    ids = list(runs.values())

    async def all_done() -> bool:
        states = await client.store.states(ids)
        return all(s is not None and s.status is RunStatus.COMPLETED for s in states)

    await eventually(all_done, timeout=40, interval=0.2)
    times = sorted(runs)
    for at in times:
        run = await client.get_run(runs[at])
        assert run.output == at, (runs[at], run.output)
        assert run.scheduled_at is not None and int(run.scheduled_at.timestamp() * 1000) == at
        assert await trace(settings, runs[at]) == ["tick@1"], runs[at]
    gaps: list[Any] = [b - a for a, b in itertools.pairwise(times) if b - a != step_ms]
    assert not gaps, f"ticks skipped: gaps of {gaps} ms in {times}"
    return times
