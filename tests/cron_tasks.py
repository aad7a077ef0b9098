"""A task with declared schedules, imported only by the processes of
test_schedules.py::test_declared_schedules_fire (`conveyor scheduler tests.cron_tasks`):
importing it in the test process would give its schedules to every in-process scheduler."""

from __future__ import annotations

from datetime import timedelta

from conveyor import Cron, Retry, current_run, task


@task(
    id="declared-tick",
    retry=Retry(max_attempts=1),
    cron=[Cron("*/2 * * * * *", payload={"label": "two"}, key="declared-two")],
    every=timedelta(seconds=3),
)
async def declared_tick(label: str = "every") -> list[object]:
    at = current_run().scheduled_at
    return [label, None if at is None else int(at.timestamp() * 1000)]
