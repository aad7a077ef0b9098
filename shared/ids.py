"""Run ids: time-ordered and unique without coordination."""

from __future__ import annotations

import os
import secrets
import time

# Random parts read from the system 256 at a time: a read per id was a tenth of the
# client's time per trigger. A forked child starts with none, so it never repeats its parent's.
_BATCH = 256
_noise: list[str] = []
os.register_at_fork(after_in_child=_noise.clear)


def new_run_id() -> str:
    if not _noise:
        hexes = secrets.token_hex(10 * _BATCH)
        _noise.extend(hexes[i : i + 20] for i in range(0, 20 * _BATCH, 20))
    return f"run_{time.time_ns() // 1_000_000:012x}{_noise.pop()}"
