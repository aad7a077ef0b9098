"""The runs index (shared/runs_index.py) on the real Redis: full pages newest first with
expired runs in the index, across bucket boundaries, cursor paging, filters, the CLI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from conveyor import Client, InvalidListing, Run, RunStatus, Settings
from conveyor.shared.keys import Keys
from conveyor.shared.redis_client import redis_client
from tests import tasks
from tests.conftest import cleanup
from tests.test_cli import conveyor

# Small buckets, so that a test crosses several of them; a short run_ttl keeps the walk
# over the retention window short.
BUCKET = 0.2


@pytest.fixture
def small(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, run_index_bucket=BUCKET, run_ttl=60.0)


@pytest.fixture
async def small_client(small: Settings) -> AsyncIterator[Client]:
    async with Client(settings=small) as c:
        yield c
    await cleanup(small)


@pytest.fixture
async def redis(small: Settings) -> AsyncIterator[aioredis.Redis]:
    r = redis_client(small)
    yield r
    await r.aclose()


def newest_first(runs: list[Run]) -> list[str]:
    return [r.id for r in sorted(runs, key=lambda r: (r.created_at, r.id), reverse=True)]


async def trigger_in_buckets(client: Client, buckets: int, per_bucket: int) -> list[Run]:
    """Runs (left QUEUED: no worker runs them) created over several buckets."""
    ids: list[str] = []
    for n in range(buckets):
        if n:
            await asyncio.sleep(BUCKET * 1.5)
        ids += [(await client.trigger("noop")).id for _ in range(per_bucket)]
    return [await client.get_run(run_id) for run_id in ids]


async def bucket_keys(redis: aioredis.Redis, settings: Settings) -> list[bytes]:
    pattern = f"{settings.namespace}:{{runs:*"
    return [k async for k in redis.scan_iter(match=pattern, count=1000)]


async def all_pages(client: Client, limit: int, **filters: Any) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        page = await client.list_runs(limit=limit, cursor=cursor, **filters)
        pages.append([r.id for r in page.runs])
        if page.cursor is None:
            return pages
        cursor = page.cursor


def flat(pages: list[list[str]]) -> list[str]:
    return [run_id for page in pages for run_id in page]


async def test_full_pages_newest_first_with_expired_runs_in_the_index(
    small: Settings, small_client: Client, redis: aioredis.Redis
) -> None:
    runs = await trigger_in_buckets(small_client, buckets=3, per_bucket=10)
    keys = Keys(small.namespace)
    assert len({k for k in await bucket_keys(redis, small) if b"noop" not in k}) >= 3
    # The newest 12 runs and every third older one expire (their hash is gone).
    order = newest_first(runs)
    gone = set(order[:12]) | set(order[12::3])
    await redis.delete(*(keys.run(run_id) for run_id in gone))
    live = [run_id for run_id in order if run_id not in gone]

    page = await small_client.list_runs(limit=5)
    assert [r.id for r in page.runs] == live[:5], "the 5 newest live runs, a full page"
    assert page.cursor is not None
    # Ids of expired runs met on the way left their buckets.
    remaining = set()
    for key in await bucket_keys(redis, small):
        if b"noop" not in key:
            remaining |= {m.decode() for m in await redis.zrange(key, 0, -1)}
    assert not remaining & set(order[:12])

    assert flat(await all_pages(small_client, 5)) == live
    assert [r.id for r in (await small_client.list_runs(limit=100)).runs] == live
    by_task = (await small_client.list_runs(task_id="noop", limit=7)).runs
    assert [r.id for r in by_task] == live[:7]


async def test_cursor_paging_gives_every_live_run_once(
    small: Settings, small_client: Client, redis: aioredis.Redis
) -> None:
    runs = await trigger_in_buckets(small_client, buckets=3, per_bucket=4)
    # A batch is created in one script call: its runs share one created_at.
    batch = await tasks.noop.batch_trigger([{}] * 25)
    runs += [await small_client.get_run(h.id) for h in batch]
    assert len({r.created_at for r in runs[-25:]}) < 25
    expected = newest_first(runs)
    for limit in (1, 3, 7, 50):
        pages = await all_pages(small_client, limit)
        assert all(len(p) == limit for p in pages[:-1]), "every page but the last is full"
        assert flat(pages) == expected, limit

    # Runs that expire between two pages are skipped; none is repeated or lost.
    first = await small_client.list_runs(limit=10)
    rest = expected[10:]
    await redis.delete(*(Keys(small.namespace).run(run_id) for run_id in rest[::2]))
    assert first.cursor is not None
    later = await all_pages_from(small_client, first.cursor, 4)
    assert later == rest[1::2]


async def all_pages_from(client: Client, cursor: str, limit: int) -> list[str]:
    ids: list[str] = []
    next_cursor: str | None = cursor
    while next_cursor is not None:
        page = await client.list_runs(limit=limit, cursor=next_cursor)
        ids += [r.id for r in page.runs]
        next_cursor = page.cursor
    return ids


async def test_filters_by_task_and_status(small: Settings, small_client: Client) -> None:
    delayed = [
        (await small_client.trigger("echo", {"value": "x"}, delay=3600)).id for _ in range(3)
    ]
    await asyncio.sleep(BUCKET * 1.5)
    queued_echo = [(await small_client.trigger("echo", {"value": "y"})).id for _ in range(4)]
    queued_noop = [(await small_client.trigger("noop")).id for _ in range(5)]
    await asyncio.sleep(BUCKET * 1.5)
    delayed.append((await small_client.trigger("noop", delay=3600)).id)

    async def ids(**filters: Any) -> set[str]:
        return set(flat(await all_pages(small_client, 2, **filters)))

    assert await ids(task_id="echo") == {*delayed[:3], *queued_echo}
    assert await ids(task_id="noop") == {*queued_noop, delayed[3]}
    assert await ids(status=RunStatus.DELAYED) == set(delayed)
    assert await ids(task_id="echo", status=RunStatus.QUEUED) == set(queued_echo)
    assert await ids(task_id="noop", status=RunStatus.DELAYED) == {delayed[3]}
    assert await ids(task_id="no-such-task") == set()
    assert await ids(status=RunStatus.COMPLETED) == set()


async def test_a_status_filter_examines_a_bounded_number_of_runs(
    small: Settings, small_client: Client
) -> None:
    delayed = await small_client.trigger("noop", delay=3600)
    await tasks.noop.batch_trigger([{}] * 1100)
    # One page looks at 1,000 entries at most (limit 1): it comes back short, with a
    # cursor, and the next page finds the run.
    first = await small_client.list_runs(status=RunStatus.DELAYED, limit=1)
    assert first.runs == [] and first.cursor is not None
    second = await small_client.list_runs(status=RunStatus.DELAYED, limit=1, cursor=first.cursor)
    assert [r.id for r in second.runs] == [delayed.id]


async def test_bad_cursor_and_limit_get_a_clear_error(client: Client) -> None:
    for cursor in ("nonsense!", "WzEsMl0", "", "WzEsMiwiIl0"):
        with pytest.raises(InvalidListing, match=f"invalid cursor {cursor!r}: ") as error:
            await client.list_runs(cursor=cursor)
        assert error.value.field == "cursor"
    with pytest.raises(InvalidListing, match="invalid limit 0: "):
        await client.list_runs(limit=0)


async def test_index_buckets_expire_with_the_runs(
    small: Settings, small_client: Client, redis: aioredis.Redis
) -> None:
    await small_client.trigger("noop")
    keys = await bucket_keys(redis, small)
    assert len(keys) == 2, "the bucket and the task's bucket"
    for key in keys:
        start = int(key.decode().split("{runs:", 1)[1].split(":")[0].rstrip("}"))
        # 2 * run_ttl past the bucket's end: a run ending within run_ttl keeps its entry.
        end = start + BUCKET * 1000
        assert await redis.pexpiretime(key) == end + 2 * small.run_ttl * 1000


async def test_cli_pages_with_a_cursor(small: Settings, small_client: Client) -> None:
    runs = await trigger_in_buckets(small_client, buckets=2, per_bucket=3)
    expected = newest_first(runs)
    env = {"CONVEYOR_RUN_INDEX_BUCKET": str(BUCKET), "CONVEYOR_RUN_TTL": "60"}
    first = await conveyor(small, "runs", "list", "--limit", "4", env=env)
    assert first.code == 0, first.err
    *lines, last = first.out.splitlines()
    assert [line.split()[0] for line in lines] == expected[:4]
    assert last.startswith("next page: --cursor ")
    cursor = last.removeprefix("next page: --cursor ")
    second = await conveyor(small, "runs", "list", "--limit", "4", "--cursor", cursor, env=env)
    assert [line.split()[0] for line in second.out.splitlines()] == expected[4:]
    as_json = await conveyor(small, "runs", "list", "--limit", "4", "--json", env=env)
    assert [r["id"] for r in as_json.json()] == expected[:4]
    assert as_json.err == f"next page: --cursor {cursor}"
    bad = await conveyor(small, "runs", "list", "--cursor", "bogus", env=env)
    assert bad.code == 1
    assert "invalid cursor 'bogus'" in bad.err and "Traceback" not in bad.err
