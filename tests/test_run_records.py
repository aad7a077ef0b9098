"""How a run is kept in Redis: a finished run stays in Redis's compact hash encoding, and
attempt records of the earlier, long-named layout are still read."""

from __future__ import annotations

from conveyor import Client
from conveyor.shared.store import _attempt_info
from conveyor.worker import Worker
from tests import tasks


async def test_a_finished_run_is_kept_in_the_compact_hash_encoding(
    client: Client, worker: Worker
) -> None:
    handle = await tasks.echo.trigger("x")
    assert await handle.result(timeout=20) == "x"
    key = client.store.keys.run(handle.id)
    assert await client.redis.object("encoding", key) == b"listpack"
    # A few hundred bytes (about 1.4 KB as a hashtable, when a value passed 64 bytes).
    usage = await client.redis.memory_usage(key, samples=0)
    assert usage is not None and usage < 600
    run = await client.get_run(handle.id)
    assert [(a.number, a.status) for a in run.attempts] == [(1, "COMPLETED")]
    assert run.attempts[0].worker == worker.id


def test_attempt_records_of_both_layouts_are_read() -> None:
    # Records written before the short names (worker inside), and after (worker beside).
    old = b'{"number":1,"status":"FAILED","started_at":1000,"finished_at":2000,"worker":"w-old","error":"boom"}'
    new = b'{"n":2,"s":"COMPLETED","t0":3000,"t1":4000}'
    mixed = b'{"number":3,"status":"EXECUTING","started_at":5000,"worker":"w-mid","s":"CRASHED","t1":6000,"e":"gone"}'
    run = {b"a:2": new, b"w:2": b"w-new"}
    first, second, third = (
        _attempt_info(b"a:1", old, run),
        _attempt_info(b"a:2", new, run),
        _attempt_info(b"a:3", mixed, run),
    )
    assert (first.number, first.status, first.worker, first.error) == (1, "FAILED", "w-old", "boom")
    assert (second.number, second.status, second.worker) == (2, "COMPLETED", "w-new")
    assert second.finished_at is not None and second.finished_at.timestamp() == 4.0
    assert (third.number, third.status, third.worker, third.error) == (
        3,
        "CRASHED",
        "w-mid",
        "gone",
    )
