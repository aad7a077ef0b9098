"""Rate and concurrency limits evaluated in Redis, on its clock, one script per call.

Each limit lives in a hash slot of its own (keys.rate, keys.slots), so its scripts run on
Redis Cluster; what a limit decides about a run is written on the run's slot apart
(throttle.lua).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec

from .batcher import Arg
from .limits import Concurrency, RateLimit
from .scripts import Scripts
from .store import RunStore


class RateAnswer(msgspec.Struct, frozen=True, gc=False):
    """go (in `wait_ms`: its turn among starts that came together), or a reservation:
    the run may start at `at_ms` (Redis's clock, now `now_ms`) and holds it until a pause
    of the limit (a new epoch) voids it."""

    go: bool
    at_ms: int = 0
    now_ms: int = 0
    epoch: str = ""
    wait_ms: int = 0


class SlotAnswer(msgspec.Struct, frozen=True, gc=False):
    """go, parked (woken when a slot frees; `running` runs hold the slots), or held (the
    run holds a slot in another worker: a second copy of its message; `wait_ms`)."""

    kind: str
    running: int = 0
    wait_ms: int = 0


class Wake(msgspec.Struct, frozen=True, gc=False):
    """A parked run given a slot: its message goes back to its queue."""

    run_id: str
    queue: str
    message: bytes


class Limiter:
    def __init__(self, store: RunStore) -> None:
        self.store = store
        self.keys = store.keys
        self.scripts = Scripts(store.batcher, ["rate_take", "rate_pause", "slots", "throttle"])
        self._lease_ms = int(store.settings.lease_ttl * 1000)

    async def _call(self, name: str, keys: list[str], args: list[Arg]) -> Any:
        """Through the store's gate while Redis is unavailable (every script here may be
        sent again: at worst a start's token is spent twice)."""
        op: Callable[[], Awaitable[Any]] = lambda: self.scripts.call(name, keys, args)  # noqa: E731
        gate = self.store.gate
        return await (op() if gate is None else gate.call(op))

    async def take_rate(self, limit: RateLimit, reserved: str | None) -> RateAnswer:
        epoch, _, at = (reserved or "").partition(":")
        reply = await self._call(
            "rate_take",
            [self.keys.rate(_name(limit))],
            [_interval_us(limit), limit.burst, epoch, at],
        )
        if reply[0] == b"go":
            return RateAnswer(True, wait_ms=int(reply[1]))
        return RateAnswer(False, int(reply[1]), int(reply[3]), reply[2].decode())

    async def pause_rate(self, limit: RateLimit, pause_ms: int) -> int:
        """Pause the limit for every worker; returns when the pause ends (Redis ms)."""
        reply = await self._call(
            "rate_pause",
            [self.keys.rate(_name(limit))],
            [max(1, pause_ms), _interval_us(limit), limit.burst],
        )
        return int(reply)

    async def take_slot(
        self, limit: Concurrency, run_id: str, worker: str, key: str, queue: str, message: bytes
    ) -> SlotAnswer:
        reply = await self._slots(limit, "take", worker, [run_id, key, queue, message])
        kind = reply[0].decode()
        if kind == "parked":
            return SlotAnswer("parked", running=int(reply[1]))
        if kind == "held":
            return SlotAnswer("held", wait_ms=max(1, int(reply[1])))
        return SlotAnswer("go")

    async def release_slot(self, limit: Concurrency, run_id: str, worker: str) -> list[Wake]:
        """Free the run's slot (if this worker holds it) and wake parked runs into the
        slots that are free."""
        return _wakes(await self._slots(limit, "release", worker, [run_id]))

    async def sweep(self, limit: Concurrency, worker: str) -> list[Wake]:
        """Free the slots of dead workers and wake parked runs into free slots, again
        for runs woken before whose message never arrived."""
        return _wakes(await self._slots(limit, "sweep", worker, []))

    async def renew(self, limit: Concurrency, worker: str, run_ids: Sequence[str]) -> int:
        return int(await self._slots(limit, "renew", worker, list(run_ids)))

    async def throttle(self, run_id: str, reason: str, not_before: int | None = None) -> None:
        """Record on the run why it has not started (cleared by the claim that starts it)."""
        await self._call(
            "throttle", [self.keys.run(run_id)], [reason, "" if not_before is None else not_before]
        )

    async def _slots(self, limit: Concurrency, op: str, worker: str, rest: list[Arg]) -> Any:
        args: list[Arg] = [op, limit.limit, limit.key_limit, self._lease_ms, worker, *rest]
        return await self._call("slots", self.keys.slots(_name(limit)), args)


def _interval_us(limit: RateLimit) -> int:
    return max(1, round(limit.interval_ms * 1000))


def _name(limit: RateLimit | Concurrency) -> str:
    assert limit.name is not None, "limits are named when their task is defined"
    return limit.name


def _wakes(reply: list[bytes]) -> list[Wake]:
    return [
        Wake(reply[i].decode(), reply[i + 1].decode(), reply[i + 2])
        for i in range(0, len(reply), 3)
    ]
