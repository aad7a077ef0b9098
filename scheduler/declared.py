"""The schedules that tasks declare (`@task(cron=..., every=...)`), as the records the
scheduler registers: each under the key `{task_id}:{n}` (n: its place in the task's
list) unless the Cron names one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from conveyor.shared.schedules import ScheduleRecord, make_record


class Declared:
    """The schedules of `tasks` (default: every task imported so far), and those tasks."""

    def __init__(self, tasks: Mapping[str, Any] | None = None) -> None:
        if tasks is None:
            from conveyor._task import registered_tasks

            tasks = registered_tasks()
        self.task_ids = sorted(tasks)
        self.schedules = declared_schedules(tasks)


def declared_schedules(tasks: Mapping[str, Any]) -> list[tuple[str, ScheduleRecord]]:
    out: list[tuple[str, ScheduleRecord]] = []
    for task in tasks.values():
        for n, cron in enumerate(task.cron):
            record = make_record(
                task.id,
                cron.expression,
                every=cron.every,
                timezone=cron.timezone,
                payload=cron.payload,
                queue=task.queue,
                declared=True,
            )
            if task.ttl is not None:
                record = msgspec.structs.replace(record, ttl_ms=int(task.ttl * 1000))
            out.append((cron.key or f"{task.id}:{n}", record))
    return out
