"""Worker processes of any system, started with its own command line and stopped with
SIGTERM (each system's graceful shutdown), SIGKILL for the whole process group if that
takes too long."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class WorkerError(Exception):
    pass


class Workers:
    """Worker processes; their output goes to `log` (banners and start-up lines would
    drown the harness's own), and its end is shown when a worker fails."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, commands: list[list[str]], env: Mapping[str, str]) -> None:
        full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        with self.log.open("ab") as out:
            for command in commands:
                # a session of its own, so that a kill reaches the pool children too
                proc = subprocess.Popen(
                    command,
                    env=full_env,
                    cwd=str(ROOT),
                    start_new_session=True,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
                self.procs.append(proc)

    def check_alive(self, what: str) -> None:
        dead = [p for p in self.procs if p.poll() is not None]
        if dead:
            codes = [p.returncode for p in dead]
            raise WorkerError(
                f"{what}: a worker process exited early ({codes}); the end of its output:\n"
                + self.tail()
            )

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"

    async def stop(self, timeout: float = 30.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.procs):
            if time.monotonic() > deadline:
                self.kill()
                raise WorkerError(f"worker processes did not stop within {timeout}s of SIGTERM")
            await asyncio.sleep(0.05)
        for proc in self.procs:  # pool children a parent left behind
            _kill_group(proc.pid)
        self.procs.clear()

    def kill(self) -> None:
        for proc in self.procs:
            _kill_group(proc.pid)
            proc.wait()
        self.procs.clear()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
