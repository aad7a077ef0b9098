"""The leader lease: one holder at a time, each acquisition under a new epoch.

The lease key expires on Redis's clock. The holder also keeps its own deadline (the
moment it sent the last successful renewal plus most of the TTL, on its monotonic
clock, which keeps running while the process is stopped), so it stops acting before
the key can expire. That is not a fence: every write the leader makes to the
scheduler's keys runs a script that first checks the key still holds its token.
"""

from __future__ import annotations

import time

from conveyor.shared.keys import Keys
from conveyor.shared.scripts import Scripts

# Stop acting this fraction of the TTL before the lease could expire in Redis.
SAFETY = 0.2


class Refused(Exception):
    """A fenced write found the lease held by another epoch: this scheduler leads no more."""


class Lease:
    def __init__(self, scripts: Scripts, keys: Keys, holder: str, ttl: float) -> None:
        self.scripts = scripts
        self.keys = [keys.leader, keys.leader_epoch]
        self.holder = holder
        self.ttl_ms = int(ttl * 1000)
        self.ttl = ttl
        self.epoch = 0
        self._until = 0.0

    @property
    def token(self) -> str:
        """What the fenced scripts compare with the lease key ('' when not leading)."""
        return f"{self.epoch}:{self.holder}" if self.epoch else ""

    def held(self) -> bool:
        return bool(self.epoch) and time.monotonic() < self._until

    async def acquire(self) -> bool:
        sent = time.monotonic()
        epoch = int(
            await self.scripts.call(
                "sched_lease", self.keys, [self.holder, self.ttl_ms, "acquire", 0]
            )
        )
        if epoch:
            self.epoch = epoch
            self._until = sent + self.ttl * (1 - SAFETY)
        return bool(epoch)

    async def renew(self) -> bool:
        """Extend the lease; False (and no longer leading) if it was lost."""
        sent = time.monotonic()
        ok = int(
            await self.scripts.call(
                "sched_lease", self.keys, [self.holder, self.ttl_ms, "renew", self.epoch]
            )
        )
        if ok:
            self._until = sent + self.ttl * (1 - SAFETY)
        else:
            self.lose()
        return bool(ok)

    def lose(self) -> None:
        self.epoch = 0
        self._until = 0.0

    async def release(self) -> None:
        if self.epoch:
            await self.scripts.call(
                "sched_lease", self.keys, [self.holder, self.ttl_ms, "release", self.epoch]
            )
        self.lose()
