"""The soak's short profile (tests/soak.py): 500 three-step runs through worker kills, two
broker restarts, a Redis crash and a scheduler leader kill; nothing may be lost or
completed twice. It restarts the shared RabbitMQ, so it runs alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.serial, pytest.mark.timeout(420)]


def test_short_soak_loses_nothing_and_completes_nothing_twice() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.soak", "--runs", "500", "--seconds", "60"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    print(proc.stdout)
    figures = dict(
        line.rsplit(None, 1) for line in proc.stdout.splitlines() if len(line.split()) >= 2
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    assert figures["accepted"] == "500"
    assert figures["lost"] == figures["completed twice"] == figures["non terminal"] == "0"
    assert int(figures["worker kills"]) >= 10
    assert figures["broker restarts"] == "2" and figures["redis kills"] == "1"
    assert figures["leader kills"] == "1"
