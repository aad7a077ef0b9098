"""A scheduled sync against an API that answers 429: the first 429 pauses the task's rate
limit for every worker, for as long as the API's Retry-After says, and the runs go on at
the pace the API takes, without failing and without using up their retries.

`python examples/rate_limited_sync.py` (or `python -m examples.rate_limited_sync`) starts,
in this process and in a namespace of its own:

- a fake inventory API on 127.0.0.1 (a free port): it serves at most 5 requests in any
  sliding second and answers 429, with a Retry-After in whole seconds, past that;
- a worker and a scheduler. `sync-catalog` is scheduled every 3 s; each tick fans out one
  `sync-item` run per changed item (batch_trigger_and_wait: the tick holds no worker while
  they run). `sync-item` calls the API in a step, under a rate limit of 10 per second,
  twice what the API takes, so the API pushes back: on 429 the step raises
  RateLimited(retry_after=<the header>).

It first makes the same calls without pausing (a plain loop at 10 per second that tries a
refused item again in its next slot), to compare. After three ticks it pauses the
schedule, waits for their runs, prints what the API served and refused second by second,
and checks that every item was synced once, no run failed, no attempt was spent on a 429,
and the sync drew far fewer 429s than the loop.

`conveyor worker examples.rate_limited_sync` and `conveyor scheduler
examples.rate_limited_sync` run the same tasks, against the API at $RATE_DEMO_API_URL.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import uvloop

from conveyor import Client, RateLimit, RateLimited, Retry, Run, Settings, current_run, step, task

API_URL_ENV = "RATE_DEMO_API_URL"
API_LIMIT = 5  # requests the API serves in any sliding second
RATE = 10.0  # the task's rate limit per second: above what the API takes, on purpose
ITEMS_PER_TICK = 10
TICKS = 3
TICK_EVERY = timedelta(seconds=3)


# -- the fake API -------------------------------------------------------------------------


class FakeInventoryAPI:
    """`PUT /items/ID` on 127.0.0.1: 200 while fewer than `limit` requests were served in
    the last `window` seconds, else 429 with Retry-After: the whole seconds until a
    request is served again. Logs every request it answers."""

    def __init__(self, limit: int, window: float = 1.0) -> None:
        self.limit = limit
        self.window = window
        self.log: list[tuple[float, str, int]] = []  # (time.monotonic(), item, status)
        self._served_at: deque[float] = deque()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def answer(self, item: str) -> tuple[int, int]:
        """(status, Retry-After seconds) for a request now."""
        with self._lock:
            now = time.monotonic()
            while self._served_at and self._served_at[0] <= now - self.window:
                self._served_at.popleft()
            if len(self._served_at) < self.limit:
                self._served_at.append(now)
                self.log.append((now, item, 200))
                return 200, 0
            self.log.append((now, item, 429))
            return 429, max(1, math.ceil(self._served_at[0] + self.window - now))

    def served(self) -> Counter[str]:
        return Counter(item for _, item, status in self.log if status == 200)

    def refused(self) -> int:
        return sum(1 for *_, status in self.log if status == 429)

    def __enter__(self) -> FakeInventoryAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _handler(api: FakeInventoryAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, retry_after = api.answer(self.path.removeprefix("/items/"))
            body = b'{"ok": true}' if status == 200 else b'{"error": "too many requests"}'
            self.send_response(status)
            if retry_after:
                self.send_header("Retry-After", str(retry_after))
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the demo prints its own account of the requests

    return Handler


def put_item(base_url: str, item: str) -> tuple[int, str | None]:
    """One blocking PUT: (status, Retry-After header); errors other than 429 raise."""
    request = urllib.request.Request(f"{base_url}/items/{item}", data=b"{}", method="PUT")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, None
    except urllib.error.HTTPError as exc:
        with exc:
            if exc.code != 429:
                raise
            return 429, exc.headers.get("Retry-After")


# -- the tasks ----------------------------------------------------------------------------


@step()
async def push(item: str) -> int:
    """PUT the item; a 429 pauses the task's rate limit for as long as the API asks."""
    status, retry_after = await asyncio.to_thread(put_item, os.environ[API_URL_ENV], item)
    if status == 429:
        raise RateLimited(retry_after=retry_after)
    return status


# burst: after a pause the limit lets up to `burst` runs start at once; kept within what
# the API takes at once, so a pause does not end in a burst the API refuses again.
@task(
    id="sync-item",
    rate_limit=RateLimit(RATE, per=1.0, burst=API_LIMIT),
    retry=Retry(max_attempts=3, min_delay=0.5),
)
async def sync_item(item: str) -> int:
    return await push(item)


@task(id="sync-catalog", every=TICK_EVERY, retry=Retry(max_attempts=2))
async def sync_catalog() -> dict[str, int]:
    """Sync the items that changed since the last tick (here: a made-up batch)."""
    at = current_run().scheduled_at
    stamp = f"{at:%H%M%S}" if at else "now"
    items = [{"item": f"sku-{stamp}-{n:02}"} for n in range(ITEMS_PER_TICK)]
    results = await sync_item.batch_trigger_and_wait(items)
    return {"synced": sum(r.ok for r in results), "failed": sum(not r.ok for r in results)}


# -- the demo -----------------------------------------------------------------------------


async def without_pausing(items: list[str]) -> FakeInventoryAPI:
    """The same calls at the limit's rate from a plain loop that ignores Retry-After: a
    refused item is tried again in the next slot. Returns the API it called (its log)."""
    with FakeInventoryAPI(API_LIMIT) as api:
        pending = deque(items)
        start = time.monotonic()
        calls = 0
        while pending:
            item = pending.popleft()
            status, _ = await asyncio.to_thread(put_item, api.url, item)
            if status == 429:
                pending.append(item)
            calls += 1
            await asyncio.sleep(max(0.0, start + calls / RATE - time.monotonic()))
    return api


def timeline(log: list[tuple[float, str, int]]) -> None:
    """What the API answered, second by second from the first request of `log`."""
    seconds: dict[int, Counter[int]] = {}
    for at, _, status in log:
        seconds.setdefault(int(at - log[0][0]), Counter())[status] += 1
    for second in range(max(seconds, default=-1) + 1):
        counts = seconds.get(second, Counter())
        bar = "o" * counts[200] + "x" * counts[429]
        print(f"  +{second}s  served {counts[200]}  refused {counts[429]}  {bar}")


async def wait_for_ticks(client: Client, sample: list[str]) -> list[str]:
    """The ids of the first TICKS tick runs, once they exist; meanwhile keeps the first
    reason a throttled item run gave for waiting."""
    while True:
        ticks = (await client.list_runs(task_id=sync_catalog.id, limit=100)).runs
        for child in [c for tick in ticks for c in tick.children] if not sample else []:
            run = await client.get_run(child)
            if run.throttled:
                sample.append(f"{run.payload['item']}: {run.throttled}")
                break
        if len(ticks) >= TICKS:
            return sorted(t.id for t in ticks)[:TICKS]  # ids end in the tick's epoch ms
        await asyncio.sleep(0.1)


def report(ticks: list[Run], items: list[Run], api: FakeInventoryAPI, loop: int) -> bool:
    """Print what the ticks and the API did; True when it went as the demo says."""
    for tick in ticks:
        at = f"{tick.scheduled_at:%H:%M:%S}" if tick.scheduled_at else "-"
        print(f"tick {at}  {tick.id}  {tick.status.value}  {tick.output}")
        mine = {run.payload["item"] for run in items if run.parent == tick.id}
        timeline([entry for entry in api.log if entry[1] in mine])
    attempts = Counter(a.status for run in items for a in run.attempts)
    expected = {run.payload["item"] for run in items}
    served = api.served()
    synced = expected & set(served)
    twice = [item for item in synced if served[item] > 1]
    unfinished = [run.id for run in items + ticks if run.status.value != "COMPLETED"]
    spent = [run.id for run in items if any(a.status == "FAILED" for a in run.attempts)]
    refused = api.refused()
    per_item, loop_per_item = refused / max(1, len(items)), loop / ITEMS_PER_TICK
    print(
        f"\nitem runs: {len(items)}, synced: {len(synced)}, synced twice: {len(twice)}, "
        f"not COMPLETED: {len(unfinished)}\n"
        f"attempts: {dict(sorted(attempts.items()))}; "
        f"runs that spent an attempt on an error: {len(spent)}\n"
        f"429s per item: {per_item:.2f} with pausing ({refused} for {len(items)}), "
        f"{loop_per_item:.2f} without ({loop} for {ITEMS_PER_TICK})"
    )
    checks = {
        f"{TICKS} ticks of {ITEMS_PER_TICK} item runs": len(ticks) == TICKS
        and len(items) == TICKS * ITEMS_PER_TICK,
        "every item synced once": synced == expected and not twice,
        "every run COMPLETED": not unfinished,
        # Each 429 ended an attempt THROTTLED, which costs no retry attempt.
        "no attempt spent on a 429": not spent and attempts["THROTTLED"] == refused,
        "under half the 429s per item of the loop": per_item < 0.5 * loop_per_item,
    }
    for claim, held in checks.items():
        if not held:
            print(f"UNEXPECTED, not so: {claim}", file=sys.stderr)
    return all(checks.values())


async def demo(settings: Settings) -> bool:
    from conveyor.scheduler import Scheduler
    from conveyor.worker import Worker

    print(
        f"the API serves {API_LIMIT} requests per sliding second; sync-item's rate limit "
        f"is {RATE:g}/s (burst {API_LIMIT})\n"
        f"\nwithout pausing: a loop makes {ITEMS_PER_TICK} calls at {RATE:g}/s, a refused "
        "one again in its next slot (o: served, x: 429)"
    )
    loop = await without_pausing([f"probe-{n:02}" for n in range(ITEMS_PER_TICK)])
    timeline(loop.log)
    with FakeInventoryAPI(API_LIMIT) as api:
        os.environ[API_URL_ENV] = api.url
        scheduler = Scheduler(settings, tasks={sync_catalog.id: sync_catalog})
        async with (
            Client(settings=settings) as client,
            Worker([sync_catalog, sync_item], settings=settings),
        ):
            print(
                f"\nwith pausing: a worker and a scheduler in this process (namespace "
                f"{settings.namespace!r}), sync-catalog every {TICK_EVERY.total_seconds():g}s, "
                "each tick's calls from its first"
            )
            running = asyncio.create_task(scheduler.run())
            try:
                sample: list[str] = []
                tick_ids = await asyncio.wait_for(wait_for_ticks(client, sample), timeout=30)
                await client.schedules.pause(f"{sync_catalog.id}:0")  # enough ticks
                for tick_id in tick_ids:
                    await client.handle(tick_id).result(timeout=30)
                ticks = [await client.get_run(t) for t in tick_ids]
                items = [await client.get_run(c) for t in ticks for c in t.children]
            finally:
                scheduler.stop()
                await running
    if sample:
        print(f"a throttled run, as get_run shows it: {sample[0]}")
    return report(ticks, items, api, loop.refused())


async def main() -> int:
    from conveyor.broker.purge import purge_namespace

    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    settings = Settings.from_env(namespace=f"ratedemo-{secrets.token_hex(4)}")
    try:
        ok = await demo(settings)
    except (OSError, ConnectionError) as exc:
        print(
            f"cannot reach RabbitMQ ({settings.amqp_url}) or Redis ({settings.redis_url}): "
            f"{exc!r}\nstart them, or set CONVEYOR_AMQP_URL and CONVEYOR_REDIS_URL",
            file=sys.stderr,
        )
        return 2
    finally:
        try:
            await purge_namespace(settings, [sync_catalog.queue, sync_item.queue])
        except (OSError, ConnectionError) as exc:
            print(f"could not clean up namespace {settings.namespace}: {exc!r}")
    print(f"namespace {settings.namespace!r} removed from RabbitMQ and Redis")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))
