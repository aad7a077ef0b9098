"""Waits: what a suspended run waits for, how a wait's outcome is saved, and how the end
of a child run reaches its parent.

A wait is a step. Its outcome is saved in the run's steps hash under the step's key, as a
`WaitResult`, so a replay returns it like any checkpoint. While it is not over, the run's
waits hash holds what it waits for (wait.lua, suspend.lua, resolve.lua).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable

import msgspec

from . import tracing
from .errors import TokenNotFound
from .models import RunMessage, RunStatus
from .store import RunStore, Woken

_encoder = msgspec.json.Encoder()


class WaitResult(msgspec.Struct, frozen=True, omit_defaults=True):
    """A wait's saved outcome: `ok` with the child's output, or the status and error the
    child ended with."""

    ok: bool
    value: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    status: str | None = None
    error: str | None = None


result_decoder = msgspec.json.Decoder(WaitResult)


def child_run_id(parent_id: str, step_key: str) -> str:
    """The id of the child run a parent's step triggers: the same on every replay, so a
    replay after a crash finds the child instead of triggering a second one."""
    digest = hashlib.sha256(f"{parent_id}\0{step_key}".encode()).hexdigest()[:32]
    return f"run_{digest}"


def child_result(status: str, output: bytes, error: str) -> bytes:
    """The WaitResult a child run's end gives its parent."""
    if status == RunStatus.COMPLETED.value:
        return _encoder.encode(WaitResult(True, msgspec.Raw(output or b"null")))
    return _encoder.encode(WaitResult(False, status=status, error=error or None))


def woken_message(run_id: str, woken: Woken) -> RunMessage:
    """The message that resumes a run nothing is left to wait for."""
    return RunMessage(
        task=woken.task,
        payload=msgspec.Raw(woken.payload or b"{}"),
        id=run_id,
        tags=woken.tags,
        scheduled_at=woken.scheduled_at,
        concurrency_key=woken.concurrency_key,
    )


async def notify_parent(
    store: RunStore,
    publish: Callable[[str, RunMessage, tracing.Carrier | None], Awaitable[None]],
    parent: str,
    parent_step: str,
    child_id: str,
    result: bytes,
) -> None:
    """Hand a child's end to the parent's waiting step, and resume the parent if that was
    the last thing it waited for (its message carries the parent's trace context).
    Idempotent: called again (a redelivered child message, the reaper) it changes nothing
    and wakes nobody twice."""
    woken = await store.resolve(parent, parent_step, child_id, result)
    if woken is not None:
        headers = tracing.woken_headers(woken.trace, woken.last_attempt)
        await publish(woken.queue, woken_message(parent, woken), headers)


async def token_outcome(store: RunStore, token_id: str, run_id: str, key: str) -> bytes | None:
    """Tell the token that this run's step waits for it; its outcome if it is over (it
    times out now if its timeout has passed), else None."""
    reply = await store.token_wait(token_id, run_id, key)
    if reply[0] == b"missing":
        raise TokenNotFound(token_id)
    if reply[0] == b"pending":
        return None
    if reply[0] == b"COMPLETED":
        return _encoder.encode(WaitResult(True, msgspec.Raw(reply[1])))
    return timed_out(token_id)


def timed_out(token_id: str) -> bytes:
    """The outcome of a wait on a token that was not completed in time."""
    return _encoder.encode(WaitResult(False, status="TIMED_OUT", error=f"token {token_id}"))
