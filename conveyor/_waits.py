"""Waiting inside a run: for child runs and for time. A run that waits holds no worker
slot: its attempt ends WAITING and a new attempt replays it when the wait is over."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from conveyor.shared.bounds import ttl_ms
from conveyor.shared.context import RunContext, Start, current_context
from conveyor.shared.errors import ConveyorError, InvalidWait, RunFailed
from conveyor.shared.store import NewRun, WaitRequest
from conveyor.shared.waits import WaitResult, child_run_id, result_decoder

if TYPE_CHECKING:
    from ._task import Task, TriggerOptions

R = TypeVar("R")


class Result(msgspec.Struct, Generic[R], frozen=True):
    """How one child run of batch_trigger_and_wait ended: `ok` with its `value`, or the
    `status` and `error` it ended with."""

    ok: bool
    value: R | None = None
    status: str | None = None
    error: str | None = None


def _child(
    ctx: RunContext, task: Task[Any, Any], key: str, payload: bytes, opts: TriggerOptions
) -> NewRun:
    delay_ms = int(opts.delay * 1000) if opts.delay else 0
    # Checked when the options were made (Task.options).
    child_ttl_ms, _ = ttl_ms(opts.ttl)
    return NewRun(
        child_run_id(ctx.info.id, key),
        task.id,
        task.queue,
        payload,
        list(opts.tags),
        None,
        delay_ms,
        parent=ctx.info.id,
        parent_step=key,
        root=ctx.root,
        concurrency_key=opts.concurrency_key or "",
        ttl_ms=child_ttl_ms or 0,
    )


def _spawner(ctx: RunContext, children: list[NewRun]) -> Start:
    """Starts the children whose waits are pending."""

    async def start(pending: list[WaitRequest]) -> dict[str, bytes]:
        if ctx.spawn is None:
            raise ConveyorError("child runs can only be waited for inside a worker")
        keys = {r.key for r in pending}
        await ctx.spawn([c for c in children if c.parent_step in keys])
        return {}

    return start


def _value(task: Task[Any, R], child_id: str, saved: bytes) -> R:
    result = result_decoder.decode(saved)
    if not result.ok:
        raise RunFailed(child_id, result.status or "FAILED", result.error)
    return task.decode_result(bytes(result.value))


async def wait_for_child(
    ctx: RunContext, task: Task[Any, R], key: str, payload: bytes, opts: TriggerOptions
) -> R:
    child = _child(ctx, task, key, payload, opts)
    [saved] = await ctx.wait([WaitRequest(key, "child", child.run_id)], _spawner(ctx, [child]))
    return _value(task, child.run_id, saved)


async def wait_for_children(
    ctx: RunContext,
    task: Task[Any, R],
    key: str,
    payloads: list[bytes],
    opts: TriggerOptions,
) -> list[Result[R]]:
    children = [_child(ctx, task, f"{key}/{i}", p, opts) for i, p in enumerate(payloads)]
    requests = [WaitRequest(c.parent_step or "", "child", c.run_id) for c in children]
    saved = await ctx.wait(requests, _spawner(ctx, children))
    results: list[Result[R]] = []
    for raw in saved:
        outcome: WaitResult = result_decoder.decode(raw)
        if outcome.ok:
            value = task.decode_result(bytes(outcome.value))
            results.append(Result(True, value))
        else:
            results.append(Result(False, status=outcome.status, error=outcome.error))
    return results


async def sleep(duration: float | timedelta) -> None:
    """Wait this long (seconds or a timedelta). In a run the wait is durable: the run
    holds no worker meanwhile, and a restart neither shortens nor restarts it."""
    seconds = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
    if not seconds >= 0:
        raise InvalidWait(f"sleep takes seconds >= 0 or a timedelta, got {duration!r}")
    ctx = current_context()
    if ctx is None:
        await asyncio.sleep(seconds)
        return
    key = ctx.step_key("sleep")
    await ctx.wait([WaitRequest(key, "sleep", delay_ms=int(seconds * 1000))])


async def sleep_until(moment: datetime) -> None:
    """Wait until `moment` (a timezone-aware datetime), durably in a run."""
    if moment.tzinfo is None:
        raise InvalidWait(
            f"sleep_until needs a timezone-aware datetime (tzinfo=UTC), got {moment!r}"
        )
    until_ms = int(moment.timestamp() * 1000)
    ctx = current_context()
    if ctx is None:
        await asyncio.sleep(max(0.0, moment.timestamp() - datetime.now().timestamp()))
        return
    key = ctx.step_key("sleep_until")
    await ctx.wait([WaitRequest(key, "sleep", until_ms=max(1, until_ms))])
