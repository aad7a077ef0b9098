"""Run ids: time-ordered and unique without coordination."""

from __future__ import annotations

import secrets
import time


def new_run_id() -> str:
    return f"run_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"
