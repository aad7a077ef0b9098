"""The runs index: run ids in time buckets, for listings newest first with a cursor.

Each bucket is a sorted set of the runs created in one window of `run_index_bucket`
(an hour by default), run id -> created_at (epoch ms); a second set per task and window
holds the same entries for that task, so a listing by task reads only that task's runs.
Buckets expire as a whole, `2 * run_ttl` after their window ends: a run's hash lives until
`run_ttl` after it ends, so its entry outlives it if it ends within `run_ttl` of being
created. Ids of runs that expired earlier are removed when a listing meets them.

The creating client names the bucket by its own clock, created_at is Redis's: a bucket
can hold a few entries from just past its window. A listing walks buckets in order and
each bucket by (created_at, id), so paging still returns each run once.
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import Any

import msgspec
from redis.asyncio.cluster import RedisCluster

from .errors import InvalidListing
from .keys import Keys
from .models import RunStatus
from .redis_client import Redis
from .settings import Settings

# Buckets whose tops are read in one round trip while a listing crosses empty windows.
BUCKETS_PER_READ = 50
# Index entries read per round trip at least (a status filter may drop most of them).
MIN_READ = 100


def examine_bound(limit: int) -> int:
    """Index entries one page examines at most: a status filter that matches few runs
    returns a short page with a cursor instead of reading every run."""
    return max(10 * limit, 1000)


def bucket_width_ms(settings: Settings) -> int:
    return max(1, round(settings.run_index_bucket * 1000))


class IndexWrite(msgspec.Struct, frozen=True, gc=False):
    """Where create.lua indexes the runs it creates now: the two buckets and their expiry."""

    bucket: str
    task_bucket: str
    expires_ms: int


# How long after its index entry a run may still be in the making (a cluster's create).
CREATE_GRACE_MS = 60_000


def index_write(keys: Keys, settings: Settings, task_id: str) -> IndexWrite:
    width = bucket_width_ms(settings)
    now = int(time.time() * 1000)
    start = now - now % width
    expires = start + width + 2 * int(settings.run_ttl * 1000)
    return IndexWrite(keys.runs_bucket(start), keys.runs_task_bucket(task_id, start), expires)


class Position(msgspec.Struct, array_like=True, frozen=True):
    """An index entry: its bucket's start and its (created_at, run id); a cursor names the
    last entry a page looked at, the next page starts just older than it."""

    bucket: int
    created_ms: int
    run_id: str


_position_decoder = msgspec.json.Decoder(Position)


def encode_cursor(position: Position) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(position)).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        position = _position_decoder.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise InvalidListing(
            "cursor",
            cursor,
            "it is not a cursor a listing returned; pass the previous page's cursor "
            "unchanged, or none to start from the newest runs",
        ) from exc
    if position.bucket < 0 or position.created_ms < 0 or not position.run_id:
        raise InvalidListing("cursor", cursor, "it names no place in the runs index")
    return position


class Candidate(msgspec.Struct, frozen=True, gc=False):
    key: str
    position: Position


class Listed(msgspec.Struct, frozen=True, gc=False):
    run_ids: list[str]
    cursor: Position | None


class IndexReader:
    """Walks the buckets of the whole namespace or of one task, newest first."""

    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.width = bucket_width_ms(settings)
        self.retention = 2 * int(settings.run_ttl * 1000) + self.width
        # Only a cluster writes an entry before its run; a run's hash outlives its creation
        # by run_ttl at least, so the grace is no longer.
        self.grace_ms = (
            min(CREATE_GRACE_MS, settings.run_ttl * 1000) if isinstance(redis, RedisCluster) else 0
        )

    def _key(self, task_id: str | None, start: int) -> str:
        if task_id is None:
            return self.keys.runs_bucket(start)
        return self.keys.runs_task_bucket(task_id, start)

    async def page(
        self, task_id: str | None, status: RunStatus | None, limit: int, cursor: str | None
    ) -> Listed:
        """Ids of up to `limit` live runs older than the cursor, newest first, and the
        position the next page starts after (None: no bucket left)."""
        after = decode_cursor(cursor) if cursor is not None else None
        seconds, micros = await self.redis.time()
        now = seconds * 1000 + micros // 1000
        oldest = now - self.retention
        oldest -= oldest % self.width
        # From one window ahead: a creating client whose clock runs ahead may name it.
        bucket = after.bucket if after else now - now % self.width + self.width
        bound = examine_bound(limit)
        found: list[str] = []
        examined = 0
        while bucket >= oldest:
            want = min(max(limit - len(found), MIN_READ), bound - examined)
            if after is not None and after.bucket == bucket:
                candidates, bucket = await self._read_after(task_id, after, want)
            else:
                candidates, bucket = await self._read_tops(task_id, bucket, oldest, want)
            live = await self._live(candidates, status)
            for candidate, matches in zip(candidates, live, strict=True):
                examined += 1
                if matches:
                    found.append(candidate.position.run_id)
                if len(found) == limit or examined == bound:
                    return Listed(found, candidate.position)
            if candidates:
                after = candidates[-1].position
        return Listed(found, None)

    async def _read_after(
        self, task_id: str | None, after: Position, want: int
    ) -> tuple[list[Candidate], int]:
        """Entries of the cursor's bucket older than it, and the bucket to read next."""
        key = self._key(task_id, after.bucket)
        async with self.redis.pipeline(transaction=False) as pipe:
            # Runs created in one script share a created_at: the ones after the cursor's id.
            pipe.zrangebyscore(key, after.created_ms, after.created_ms)
            pipe.zrevrangebyscore(
                key, f"({after.created_ms}", "-inf", start=0, num=want, withscores=True
            )
            ties, older = await pipe.execute()
        same = sorted((m.decode() for m in ties if m.decode() < after.run_id), reverse=True)
        entries = [(run_id, after.created_ms) for run_id in same]
        entries += [(m.decode(), int(score)) for m, score in older]
        candidates = [Candidate(key, Position(after.bucket, s, r)) for r, s in entries]
        # The bucket may hold more than `want` older entries: read on from the last one.
        next_bucket = after.bucket if len(older) == want else after.bucket - self.width
        return candidates, next_bucket

    async def _read_tops(
        self, task_id: str | None, bucket: int, oldest: int, want: int
    ) -> tuple[list[Candidate], int]:
        """The newest entries of up to BUCKETS_PER_READ buckets from `bucket` on, up to
        the first that may hold more than that; and the bucket to read next."""
        starts = [
            bucket - k * self.width
            for k in range(BUCKETS_PER_READ)
            if bucket - k * self.width >= oldest
        ]
        async with self.redis.pipeline(transaction=False) as pipe:
            for start in starts:
                pipe.zrevrangebyscore(
                    self._key(task_id, start), "+inf", "-inf", start=0, num=want, withscores=True
                )
            replies: list[Any] = await pipe.execute()
        candidates: list[Candidate] = []
        for start, reply in zip(starts, replies, strict=True):
            key = self._key(task_id, start)
            candidates += [Candidate(key, Position(start, int(s), m.decode())) for m, s in reply]
            if len(candidates) >= want:
                # The rest of this bucket comes through _read_after on the next round.
                return candidates[:want], start
        return candidates, starts[-1] - self.width

    async def _live(self, candidates: list[Candidate], status: RunStatus | None) -> list[bool]:
        """Whether each candidate's run still exists (and has the status); ids of runs that
        expired are removed from their bucket."""
        if not candidates:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for candidate in candidates:
                pipe.hget(self.keys.run(candidate.position.run_id), "status")
            statuses: list[bytes | None] = await pipe.execute()
        gone: dict[str, list[str]] = {}
        # On a Redis Cluster an entry is written just before its run (shared/cluster_create.py):
        # a young entry without a run may be one being created, so it is skipped, not removed.
        settled = time.time() * 1000 - self.grace_ms
        for candidate, current in zip(candidates, statuses, strict=True):
            if current is None and candidate.position.created_ms < settled:
                gone.setdefault(candidate.key, []).append(candidate.position.run_id)
        if gone:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, run_ids in gone.items():
                    pipe.zrem(key, *run_ids)
                await pipe.execute()
        wanted = None if status is None else status.value.encode()
        return [s is not None and (wanted is None or s == wanted) for s in statuses]
