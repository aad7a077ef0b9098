"""Type checkers see a task's own signature on `trigger` (mypy run on a snippet).

Each line of the snippet that ends in `# R: <type>` must reveal that type and each line
ending in `# E: <code>` must be a mypy error of that code; any other error fails the test.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

SNIPPET = """
from datetime import timedelta

from conveyor import Client, Cron, RunInfo, current_run, run_step, step, task


@task(id="typing-add")
async def add(a: int, b: int = 1) -> list[str]:
    return [str(a + b)]


@step()
async def fetch(url: str) -> bytes:
    return url.encode()


def parse(raw: bytes, strict: bool = False) -> dict[str, int]:
    return {}


def not_async(a: int) -> int:
    return a


async def main(client: Client) -> None:
    handle = await add.trigger(1, b=2)
    reveal_type(handle)  # R: RunHandle[list[str]]
    reveal_type(await handle.result())  # R: list[str]
    reveal_type(await handle.result(timeout=1.5))  # R: list[str]
    reveal_type(add.trigger)  # R: def (a: int, b: int =) -> Coroutine[Any, Any, RunHandle[list[str]]]
    await add.trigger("1")  # E: arg-type
    await add.trigger(1, c=3)  # E: call-arg
    await add.trigger()  # E: call-arg
    bound = add.options(idempotency_key="k", delay=1.0, tags=["x"])
    reveal_type(await bound.trigger(a=1))  # R: RunHandle[list[str]]
    await bound.trigger(a="1")  # E: arg-type
    reveal_type(await add.options(ttl=timedelta(seconds=30)).trigger(a=1))  # R: RunHandle[list[str]]
    add.options(ttl="30")  # E: arg-type
    task(id="typing-ttl", ttl=1.5)
    task(id="typing-ttl-2", ttl="1m")  # E: arg-type
    reveal_type(await client.trigger("typing-add", ttl=30))  # R: RunHandle[Any]
    reveal_type((await client.get_run("r")).expires_at)  # R: datetime | None
    reveal_type(await add.batch_trigger([{"a": 1}, {"a": 2}]))  # R: list[RunHandle[list[str]]]
    reveal_type(await client.trigger("typing-add", {"a": 1}))  # R: RunHandle[Any]
    reveal_type(fetch)  # R: def (url: str) -> Awaitable[bytes]
    reveal_type(await run_step("fetch", fetch, "u"))  # R: bytes
    reveal_type(await run_step("parse", parse, b"x", strict=True))  # R: dict[str, int]
    await run_step("parse", parse, "x")  # E: call-overload
    info: RunInfo = current_run()
    reveal_type(info.attempt)  # R: int
    reveal_type(info.scheduled_at)  # R: datetime | None
    reveal_type(await client.schedules.create("typing-add", "* * * * *", payload={"a": 1}))  # R: Schedule
    reveal_type(await client.schedules.list())  # R: list[Schedule]
    task(id="typing-cron", cron=[Cron("0 9 * * *", timezone="Europe/Paris")], every=timedelta(hours=1))
    task(id="typing-cron-2", cron=3)  # E: arg-type
    task(id="not-async")(not_async)  # E: arg-type
    reveal_type(await add.trigger_and_wait(1, b=2))  # R: list[str]
    await add.trigger_and_wait("1")  # E: arg-type
    results = await add.batch_trigger_and_wait([{"a": 1}])
    reveal_type(results)  # R: list[Result[list[str]]]
    reveal_type(info.step_idempotency_key)  # R: str | None
"""

# Stays between runs so that only the first run on a machine pays for a cold mypy.
CACHE = Path(tempfile.gettempdir()) / "conveyor-test-typing-mypy-cache"


def _normalize(type_text: str) -> str:
    """mypy prints qualified names (builtins.int, conveyor._client.RunHandle, ...)."""
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*)", "", type_text).rstrip("?")


def test_trigger_keeps_the_task_signature(tmp_path: Path) -> None:
    source = tmp_path / "snippet.py"
    source.write_text(SNIPPET)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--show-error-codes",
            "--no-error-summary",
            "--no-color-output",
            "--cache-dir",
            str(CACHE),
            source.name,
        ],
        cwd=tmp_path,  # away from the checkout, so `conveyor` is the installed package
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert "Cannot find implementation" not in proc.stdout, proc.stdout

    expected_types: dict[int, str] = {}
    expected_errors: dict[int, str] = {}
    for number, line in enumerate(SNIPPET.splitlines(), start=1):
        if "# R: " in line:
            expected_types[number] = line.split("# R: ", 1)[1]
        elif "# E: " in line:
            expected_errors[number] = line.split("# E: ", 1)[1]

    revealed: dict[int, str] = {}
    errors: dict[int, list[str]] = {}
    for out in proc.stdout.splitlines():
        m = re.match(r"snippet\.py:(\d+): (note|error): (.*)$", out)
        if m is None:
            continue
        number, kind, text = int(m[1]), m[2], m[3]
        if kind == "note" and text.startswith("Revealed type is "):
            revealed[number] = _normalize(text.removeprefix("Revealed type is ").strip('"'))
        elif kind == "error":
            code = re.search(r"\[([a-z-]+)\]$", text)
            errors.setdefault(number, []).append(code[1] if code else text)

    assert revealed == expected_types, proc.stdout
    assert {n: codes for n, codes in errors.items()} == {
        n: [code] for n, code in expected_errors.items()
    }, proc.stdout
