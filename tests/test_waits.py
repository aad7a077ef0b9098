"""Child runs and durable sleeps (issue 9): a waiting run holds no worker slot, waits
compose with asyncio.gather, and a replay neither triggers a child twice nor restarts a
sleep."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor import Client, RunStatus, Settings
from conveyor.shared.waits import child_run_id
from conveyor.worker import Worker
from tests import tasks
from tests.conftest import eventually
from tests.faults import LOSE_WAKEUPS, announced_token, trace, wait_for_consumers


async def test_gathered_children_run_in_parallel_and_each_runs_once(
    client: Client, worker: Worker, settings: Settings
) -> None:
    handle = await tasks.gather_doubles.trigger()
    assert await handle.result(timeout=20) == [2, 4, 6]
    run = await client.get_run(handle.id)
    assert run is not None
    # One suspension for the three waits together, then one replay that finds them done.
    assert [a.status for a in run.attempts] == ["WAITING", "COMPLETED"]
    assert await trace(settings, handle.id) == ["gather-doubles@1", "gather-doubles@2"]
    for i, x in enumerate((1, 2, 3)):
        child = child_run_id(handle.id, f"trigger_and_wait:double#{i}")
        assert await trace(settings, child) == [f"double:{x}@1"]


async def test_a_parent_waiting_on_100_children_frees_its_slot(
    client: Client, settings: Settings
) -> None:
    # Concurrency 2: the parent and one child at a time. A parent that kept its slot while
    # it waited would leave one slot for 100 children; one that kept both, none.
    async with Worker(tasks.ALL, settings=settings, concurrency=2):
        handle = await tasks.fan_out.trigger(n=100)
        assert await handle.result(timeout=60) == sum(2 * i for i in range(100))


async def test_a_childs_failure_reaches_the_parent_which_may_catch_it(
    client: Client, worker: Worker
) -> None:
    handle = await tasks.catch_child_failure.trigger()
    result = await handle.result(timeout=30)
    assert result.startswith("FAILED: RuntimeError: attempt"), result


async def test_a_retry_in_a_grandchild_reaches_the_top(
    client: Client, worker: Worker, settings: Settings
) -> None:
    handle = await tasks.top.trigger(x=4)
    assert await handle.result(timeout=30) == (2 * 4 + 1) * 10
    child = child_run_id(handle.id, "trigger_and_wait:middle#0")
    grandchild = child_run_id(child, "trigger_and_wait:flaky-double#0")
    assert await trace(settings, grandchild) == ["flaky-double:4@1", "flaky-double:4@2"]
    run = await client.get_run(grandchild)
    assert run is not None and run.status is RunStatus.COMPLETED


async def test_a_sleeping_run_frees_its_worker_and_sleeps_its_time(
    client: Client, settings: Settings
) -> None:
    async with Worker(tasks.ALL, settings=settings, concurrency=1):
        sleeper = await tasks.dozer.trigger(seconds=3.0)
        await asyncio.sleep(0.5)
        began = time.monotonic()
        # The only slot is free while the run sleeps: other runs go through meanwhile.
        others = [await tasks.echo.trigger(value="x") for _ in range(5)]
        for other in others:
            assert await other.result(timeout=10) == "x"
        assert time.monotonic() - began < 2.5, "other runs waited for the sleeping one"
        slept = await sleeper.result(timeout=20)
    assert 3.0 <= slept < 4.5, slept
    run = await client.get_run(sleeper.id)
    assert run is not None
    assert [a.status for a in run.attempts] == ["WAITING", "COMPLETED"]


@pytest.mark.parametrize("seconds", [-1.0, float("nan")])
async def test_a_bad_sleep_is_refused(seconds: float) -> None:
    from conveyor import InvalidWait, sleep

    with pytest.raises(InvalidWait, match="sleep takes seconds"):
        await sleep(seconds)


async def test_sigkill_of_workers_while_a_parent_waits_and_children_run(
    client: Client, settings: Settings, spawn_worker: Any
) -> None:
    """Both worker processes are SIGKILLed while the parent is suspended and children
    run; new workers finish everything: every child completes, the parent completes once."""
    first = [spawn_worker("--concurrency", "4"), spawn_worker("--concurrency", "4")]
    await wait_for_consumers(settings, "fan-out", 2)
    handle = await tasks.fan_out.trigger(n=20, seconds=0.4)
    children = [
        child_run_id(handle.id, f"batch_trigger_and_wait:slow-double#0/{i}") for i in range(20)
    ]

    async def children_running() -> bool:
        return any([await trace(settings, c) for c in children[:8]])

    await eventually(children_running, timeout=20)
    for worker in first:
        worker.kill()
        worker.proc.wait()
    spawn_worker("--concurrency", "4")
    spawn_worker("--concurrency", "4")
    assert await handle.result(timeout=90) == sum(2 * i for i in range(20))
    run = await client.get_run(handle.id)
    assert run is not None
    assert [a.status for a in run.attempts][-1] == "COMPLETED"
    assert [a.status for a in run.attempts].count("COMPLETED") == 1
    states = await client.store.states(children)
    assert all(s is not None and s.status is RunStatus.COMPLETED for s in states)


async def test_a_run_tree_shows_parent_root_and_children(
    client: Client, worker: Worker, settings: Settings
) -> None:
    from tests.test_cli import conveyor

    handle = await tasks.top.trigger(x=1)
    assert await handle.result(timeout=30) == 30
    child = child_run_id(handle.id, "trigger_and_wait:middle#0")
    grandchild = child_run_id(child, "trigger_and_wait:flaky-double#0")
    top, middle = await client.get_run(handle.id), await client.get_run(child)
    assert (top.parent, top.root, top.children) == (None, None, [child])
    assert (middle.parent, middle.root, middle.children) == (handle.id, handle.id, [grandchild])
    assert (await client.get_run(grandchild)).root == handle.id
    tree = (await conveyor(settings, "runs", "tree", handle.id, "--json")).json()
    assert [(n["depth"], n["id"], n["status"]) for n in tree] == [
        (0, handle.id, "COMPLETED"),
        (1, child, "COMPLETED"),
        (2, grandchild, "COMPLETED"),
    ]


async def test_canceling_a_parent_cancels_its_unfinished_children(
    client: Client, worker: Worker
) -> None:
    handle = await tasks.fan_out.trigger(n=3, seconds=30)

    async def children_started() -> list[str] | None:
        run = await client.get_run(handle.id)
        return run.children if run.status is RunStatus.WAITING else None

    children = await eventually(children_started, timeout=20)
    assert await client.cancel(handle.id) is RunStatus.WAITING

    async def all_canceled() -> bool:
        states = await client.store.states([handle.id, *children])
        return all(s is not None and s.status is RunStatus.CANCELED for s in states)

    await eventually(all_canceled, timeout=20)


async def test_a_completed_token_resumes_its_run_with_the_data(
    client: Client, worker: Worker, settings: Settings
) -> None:
    from conveyor import TokenNotFound, TokenNotPending

    handle = await tasks.approval.trigger(timeout=60)
    token_id = await announced_token(settings, handle.id)

    async def waiting() -> bool:
        return (await client.get_run(handle.id)).status is RunStatus.WAITING

    await eventually(waiting, timeout=20)
    await client.complete_token(token_id, {"approved": True})
    assert await handle.result(timeout=20) == {"data": {"approved": True}}
    with pytest.raises(TokenNotPending, match="completed already"):
        await client.complete_token(token_id, {"approved": False})
    with pytest.raises(TokenNotFound, match="no token 'tok_nope'"):
        await client.complete_token("tok_nope", 1)


async def test_a_token_not_completed_in_time_raises_token_timeout_in_the_task(
    client: Client, worker: Worker, settings: Settings
) -> None:
    from conveyor import TokenNotPending

    handle = await tasks.approval.trigger(timeout=1.5)
    token_id = await announced_token(settings, handle.id)
    assert await handle.result(timeout=20) == {"timed_out": True}
    with pytest.raises(TokenNotPending, match="timed out"):
        await client.complete_token(token_id, "late")


async def test_tokens_complete_from_the_cli(
    client: Client, worker: Worker, settings: Settings
) -> None:
    from tests.test_cli import conveyor

    handle = await tasks.approval.trigger(timeout=60)
    token_id = await announced_token(settings, handle.id)
    done = await conveyor(settings, "tokens", "complete", token_id, "--data", '{"ok": 1}')
    assert done.code == 0, done.err
    assert await handle.result(timeout=20) == {"data": {"ok": 1}}
    again = await conveyor(settings, "tokens", "complete", token_id, "--data", "2")
    assert again.code == 1 and "completed already" in again.err
    bad = await conveyor(settings, "tokens", "complete", token_id, "--data", "{")
    assert bad.code == 1 and "--data is not valid JSON" in bad.err


async def test_a_steps_idempotency_key_is_the_same_on_every_attempt(
    client: Client, worker: Worker, settings: Settings
) -> None:
    handle = await tasks.pay.trigger()
    key = f"{handle.id}:charge#0"
    assert await handle.result(timeout=20) == {"outside": None, "inside": key}
    assert await trace(settings, handle.id) == [f"charge:{key}@1", f"charge:{key}@2"]


async def test_a_run_triggered_inside_a_run_is_recorded_as_its_child(
    client: Client, worker: Worker
) -> None:
    handle = await tasks.spawner.trigger()
    child = await handle.result(timeout=20)
    assert await client.handle(child).result(timeout=20) == "child"
    assert (await client.get_run(handle.id)).children == [child]
    run = await client.get_run(child)
    assert (run.parent, run.root) == (handle.id, handle.id)


async def test_a_parent_waiting_on_1000_children_over_two_worker_processes(
    client: Client, settings: Settings, spawn_worker: Any
) -> None:
    spawn_worker("--concurrency", "50")
    spawn_worker("--concurrency", "50")
    await wait_for_consumers(settings, "fan-out", 2)
    handle = await tasks.fan_out.trigger(n=1000)
    assert await handle.result(timeout=120) == sum(2 * i for i in range(1000))
    run = await client.get_run(handle.id)
    assert len(run.children) == 1000
    assert [a.status for a in run.attempts] == ["WAITING", "COMPLETED"]


async def test_a_worker_restart_neither_shortens_nor_lengthens_a_sleep(
    client: Client, settings: Settings, spawn_worker: Any
) -> None:
    first = spawn_worker()
    await wait_for_consumers(settings, "dozer", 1)
    handle = await tasks.dozer.trigger(seconds=4.0)

    async def asleep() -> bool:
        return (await client.get_run(handle.id)).status is RunStatus.WAITING

    await eventually(asleep, timeout=20)
    first.kill()
    first.proc.wait()
    await asyncio.sleep(1.0)
    spawn_worker()
    slept = await handle.result(timeout=30)
    assert 4.0 <= slept < 5.0, slept


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


async def test_10000_sleeping_runs_use_no_worker_memory(
    client: Client, settings: Settings, spawn_worker: Any
) -> None:
    worker = spawn_worker("--concurrency", "100")
    await wait_for_consumers(settings, "dozer", 1)
    # Warm up (imports, connections, the first runs' allocations) before the baseline.
    warm = await tasks.dozer.batch_trigger([{"seconds": 0.0}] * 200)
    for h in warm:
        await h.result(timeout=30)
    before = _rss_mb(worker.proc.pid)
    handles = []
    for _ in range(20):
        handles += await tasks.dozer.batch_trigger([{"seconds": 600.0}] * 500)
    ids = [h.id for h in handles]

    async def all_asleep() -> bool:
        states = await client.store.states(ids)
        return all(s is not None and s.status is RunStatus.WAITING for s in states)

    await eventually(all_asleep, timeout=180, interval=1.0)
    after = _rss_mb(worker.proc.pid)
    print(f"worker RSS {before:.1f} MB before, {after:.1f} MB with 10,000 runs asleep")
    # A run held in the worker would cost kilobytes each: tens of megabytes for 10,000.
    assert after - before < 15, f"RSS grew {after - before:.1f} MB with 10,000 sleeping runs"


async def test_waiting_runs_whose_wakeups_are_lost_are_woken_by_the_reaper(
    client: Client, settings: Settings, spawn_worker: Any, spawn_scheduler: Any
) -> None:
    spawn_worker("tests.faults", env={LOSE_WAKEUPS: "1"})
    spawn_scheduler()
    await wait_for_consumers(settings, "gather-doubles", 1)
    parent = await tasks.gather_doubles.trigger()  # woken by its last child's end
    sleeper = await tasks.dozer.trigger(seconds=1.0)  # woken by its timer's message
    assert await parent.result(timeout=30) == [2, 4, 6]
    slept = await sleeper.result(timeout=30)
    # Late by the reaper's bound (reap_after 1 s, a pass every 0.3 s here), not lost.
    assert 1.0 <= slept < 10.0, slept


async def test_canceling_the_top_of_a_tree_cancels_the_rest(
    client: Client, worker: Worker, settings: Settings
) -> None:
    handle = await tasks.top_slow.trigger(seconds=30)
    middle = child_run_id(handle.id, "trigger_and_wait:middle-slow#0")
    bottom = child_run_id(middle, "trigger_and_wait:slow-double#0")

    async def bottom_running() -> bool:
        return bool(await trace(settings, bottom))

    await eventually(bottom_running, timeout=20)
    await client.cancel(handle.id)

    async def all_canceled() -> bool:
        states = await client.store.states([handle.id, middle, bottom])
        return all(s is not None and s.status is RunStatus.CANCELED for s in states)

    await eventually(all_canceled, timeout=20)
