"""Timestamps written by the benchmark tasks of every system, read by the harness.

Each task calls `record(tag)` as it runs; that appends (tag, time.time()) as two doubles to
a file of its own process in the directory named by BENCH_STAMPS. One write syscall per
task, the same for every system, and no broker or Redis traffic, so the record does not
favour anyone. The harness counts records to know when a phase is done and reads them
to compute rates and latencies.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Sequence
from pathlib import Path

RECORD = struct.Struct("dd")

# Tags: a latency task passes the time its trigger started (a large positive number).
DRAIN = 0.0
CHAIN_FIRST = 1.0
CHAIN_LAST = 3.0
FANOUT_START = 4.0  # the parent starts (once, whatever replays it)
FANOUT_CHILD = 5.0  # a child runs
FANOUT_END = 6.0  # the parent holds every child's result, and they are the right ones
FANOUT_WRONG = 7.0  # the parent holds results, but not the ones its children returned

_fd: int | None = None
_pid = 0


def record(tag: float) -> None:
    global _fd, _pid
    if _fd is None or _pid != os.getpid():  # a forked pool child opens its own file
        _pid = os.getpid()
        path = Path(os.environ["BENCH_STAMPS"]) / f"{_pid}.bin"
        _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_fd, RECORD.pack(tag, time.time()))


def record_collected(values: Sequence[object], count: int) -> None:
    """A fan-out parent holds its children's results: child i returned i."""
    record(FANOUT_END if list(values) == list(range(count)) else FANOUT_WRONG)


class Reader:
    """Reads the records written since `mark()` in one stamps directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._offsets: dict[Path, int] = {}

    def mark(self) -> None:
        self._offsets = {p: p.stat().st_size for p in self._files()}

    def count(self) -> int:
        return sum(
            (p.stat().st_size - self._offsets.get(p, 0)) // RECORD.size for p in self._files()
        )

    def read(self) -> list[tuple[float, float]]:
        records: list[tuple[float, float]] = []
        for path in self._files():
            data = path.read_bytes()[self._offsets.get(path, 0) :]
            usable = len(data) - len(data) % RECORD.size
            records += [r for r in RECORD.iter_unpack(data[:usable])]
        return records

    def _files(self) -> list[Path]:
        return sorted(self.directory.glob("*.bin"))
