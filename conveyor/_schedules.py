"""`client.schedules`: create, list, pause, resume and delete cron schedules."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from conveyor.shared.cron import check_key
from conveyor.shared.schedules import Schedule, ScheduleStore, default_key, make_record


class Schedules:
    """The schedules of the client's namespace. They fire while a `conveyor scheduler`
    runs (a worker of the task's queue runs them)."""

    def __init__(self, store: ScheduleStore) -> None:
        self._store = store

    async def create(
        self,
        task_id: str,
        cron: str | None = None,
        *,
        every: timedelta | None = None,
        timezone: str = "UTC",
        payload: dict[str, Any] | None = None,
        key: str | None = None,
        queue: str | None = None,
    ) -> Schedule:
        """Schedule runs of `task_id` with `payload` as keyword arguments: at the times of
        `cron` (5 fields, or 6 with seconds first) in `timezone`, or `every` interval.
        Creating a `key` that exists updates it (a paused one stays paused); without a
        key, the same schedule created twice is one. Raises InvalidSchedule."""
        record = make_record(
            task_id, cron, every=every, timezone=timezone, payload=payload, queue=queue
        )
        return await self._store.put(check_key(key) if key else default_key(record), record)

    async def get(self, key: str) -> Schedule:
        """Raises ScheduleNotFound."""
        return await self._store.get(key)

    async def list(self) -> list[Schedule]:
        return await self._store.list()

    async def delete(self, key: str) -> None:
        """Raises ScheduleNotFound. A declared schedule comes back when a scheduler
        that imports its task starts."""
        await self._store.delete(key)

    async def pause(self, key: str) -> Schedule:
        """No ticks fire until resumed; those that would have are not fired later."""
        return await self._store.pause(key)

    async def resume(self, key: str) -> Schedule:
        """Fires again from the first tick after now."""
        return await self._store.resume(key)
