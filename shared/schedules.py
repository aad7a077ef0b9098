"""Schedules in Redis: a record per schedule in one hash and, for those not paused, the
next fire time in a sorted set (the due index the leader's ticker reads). Both keys have
the `{sched}` hash tag, beside the leader lease, so the ticker's fenced script checks the
lease and moves schedules on one slot. Written by the client, the CLI and the
scheduler's registration of declared schedules; fired by the leader (scheduler/cron.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from .batcher import CommandBatcher
from .cron import Spec, check_key, spec
from .errors import InvalidSchedule, ScheduleNotFound
from .keys import Keys
from .names import check_name
from .redis_client import Redis
from .scripts import Scripts


class ScheduleRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What Redis holds for a schedule. New fields get defaults (older records decode)."""

    task_id: str
    queue: str
    expression: str | None = None
    every_ms: int = 0
    timezone: str = "UTC"
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    paused: bool = False
    # Made by a @task(cron=...) the scheduler registered (else by the API or the CLI).
    declared: bool = False
    # The task's ttl (@task(ttl=...)), for the runs its ticks make; 0: none.
    ttl_ms: int = 0

    def spec(self) -> Spec:
        return spec(
            self.expression,
            self.timezone,
            timedelta(milliseconds=self.every_ms) if self.every_ms else None,
        )


class Schedule(msgspec.Struct, frozen=True):
    """A schedule as `client.schedules` returns it. `next_at`: its next tick (None when
    paused)."""

    key: str
    task_id: str
    queue: str
    cron: str | None
    every: timedelta | None
    timezone: str
    payload: dict[str, Any]
    paused: bool
    declared: bool
    next_at: datetime | None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ScheduleRecord)


def encode(record: ScheduleRecord) -> bytes:
    return _encoder.encode(record)


def decode(raw: bytes) -> ScheduleRecord:
    return _decoder.decode(raw)


def make_record(
    task_id: str,
    expression: str | None,
    *,
    every: timedelta | None = None,
    timezone: str = "UTC",
    payload: dict[str, Any] | None = None,
    queue: str | None = None,
    declared: bool = False,
) -> ScheduleRecord:
    """A checked record: raises InvalidSchedule (or ConfigurationError for a bad name)."""
    check_name("task id", task_id)
    check_name("queue", queue or task_id)
    spec(expression, timezone, every)
    try:
        _encoder.encode(payload or {})
    except (TypeError, ValueError) as exc:
        raise InvalidSchedule("payload", f"is not JSON-serializable: {exc}") from exc
    return ScheduleRecord(
        task_id=task_id,
        queue=queue or task_id,
        expression=expression,
        every_ms=every // timedelta(milliseconds=1) if every else 0,
        timezone=timezone,
        payload=dict(payload or {}),
        declared=declared,
    )


def default_key(record: ScheduleRecord) -> str:
    """The key of a schedule created without one: the same schedule created twice is one."""
    digest = hashlib.sha1(encode(msgspec.structs.replace(record, declared=False))).hexdigest()
    return f"{record.task_id}:{digest[:12]}"


class ScheduleStore:
    def __init__(self, redis: Redis, batcher: CommandBatcher, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = Scripts(batcher, ["sched_put"])
        self._ks = [keys.schedules, keys.schedules_due]

    async def now_ms(self) -> int:
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def put(self, key: str, record: ScheduleRecord, *, keep: bool = True) -> Schedule:
        """Create or update `key`. A paused schedule stays paused; one whose record is
        unchanged keeps its next fire time (with `keep`); otherwise it fires next at the
        first tick after now (on Redis's clock)."""
        check_key(key)
        old: Any = await self.redis.hget(self.keys.schedules, key)
        if old is not None and decode(old).paused:
            record = msgspec.structs.replace(record, paused=True)
        return await self._write(key, record, keep=keep)

    async def _write(self, key: str, record: ScheduleRecord, *, keep: bool) -> Schedule:
        next_ms = None if record.paused else record.spec().next_after(await self.now_ms())
        await self.scripts.call(
            "sched_put",
            self._ks,
            [key, encode(record), "" if next_ms is None else next_ms, "1" if keep else "0"],
        )
        return await self.get(key)

    async def get(self, key: str) -> Schedule:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(self.keys.schedules, key)
            pipe.zscore(self.keys.schedules_due, key)
            raw, score = await pipe.execute()
        if raw is None:
            raise ScheduleNotFound(key)
        return _view(key, decode(raw), score)

    async def list(self) -> list[Schedule]:
        """Every schedule, by key."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.schedules)
            pipe.zrange(self.keys.schedules_due, 0, -1, withscores=True)
            records, due = await pipe.execute()
        scores = {k: s for k, s in due}
        return [_view(k.decode(), decode(raw), scores.get(k)) for k, raw in sorted(records.items())]

    async def delete(self, key: str) -> None:
        if not await self.scripts.call("sched_put", self._ks, [key, "", "", "0"]):
            raise ScheduleNotFound(key)

    async def pause(self, key: str) -> Schedule:
        """Stop firing: ticks while paused are not fired later."""
        record = await self._record(key)
        return await self._write(key, msgspec.structs.replace(record, paused=True), keep=False)

    async def resume(self, key: str) -> Schedule:
        """Fire again from the first tick after now."""
        record = await self._record(key)
        return await self._write(key, msgspec.structs.replace(record, paused=False), keep=False)

    async def register(
        self, declared: Sequence[tuple[str, ScheduleRecord]], tasks: Collection[str]
    ) -> int:
        """Write the schedules the scheduler's modules declare, and delete the declared
        ones of `tasks` (the tasks it imported) that the code no longer declares. Returns
        how many changed."""
        wanted = dict(declared)
        changed = 0
        stored: Any = await self.redis.hgetall(self.keys.schedules)
        for key, raw in stored.items():
            name = key.decode()
            record = decode(raw)
            if record.declared and record.task_id in tasks and name not in wanted:
                await self.delete(name)
                changed += 1
        for key, record in wanted.items():
            before: Any = await self.redis.hget(self.keys.schedules, key)
            await self.put(key, record)
            if before is None or decode(before) != record:
                changed += 1
        return changed

    async def _record(self, key: str) -> ScheduleRecord:
        raw: Any = await self.redis.hget(self.keys.schedules, key)
        if raw is None:
            raise ScheduleNotFound(key)
        return decode(raw)


def _view(key: str, record: ScheduleRecord, score: float | None) -> Schedule:
    return Schedule(
        key=key,
        task_id=record.task_id,
        queue=record.queue,
        cron=record.expression,
        every=timedelta(milliseconds=record.every_ms) if record.every_ms else None,
        timezone=record.timezone,
        payload=record.payload,
        paused=record.paused,
        declared=record.declared,
        next_at=None if score is None else datetime.fromtimestamp(score / 1000, UTC),
    )
