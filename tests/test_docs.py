"""The README is tested: its runnable Python blocks run against the real services and print
what their comments say, its commands parse with the CLI, its settings table matches the
code.

Convention: a ```python block preceded by the line `<!-- runnable: NAME -->` belongs to
the program NAME. The blocks of one program run in order, in one process and one set of
globals, in a namespace of their own; a block may use top-level `await` (as at the
`python -m asyncio` prompt), run on one uvloop event loop. A `print(...)` line with a
trailing comment must print exactly that comment's text. Every other python block must at
least compile.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import tokenize
from pathlib import Path
from typing import Any

import msgspec
import pytest

from conveyor import Settings
from conveyor.broker.purge import purge_namespace
from conveyor.cli import build_parser
from tests.conftest import ROOT, Services

README = ROOT / "README.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.DOTALL | re.MULTILINE)
MARKER = re.compile(r"<!-- runnable: ([\w-]+) -->\n$")

# Runs the blocks of one program (a JSON list of [first line, source]) from sys.argv[1].
RUNNER = """
import ast, asyncio, inspect, json, sys
import uvloop

blocks = json.load(open(sys.argv[1]))
scope = {"__name__": "__main__"}
loop = uvloop.new_event_loop()
asyncio.set_event_loop(loop)
for line, source in blocks:
    # Padding keeps README line numbers in tracebacks.
    code = compile("\\n" * (line - 1) + source, "README.md", "exec",
                   flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if code.co_flags & inspect.CO_COROUTINE:
        loop.run_until_complete(eval(code, scope))
    else:
        exec(code, scope)
"""


class Block(msgspec.Struct, frozen=True):
    lang: str
    line: int  # of the first line of code
    source: str
    program: str | None


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    found = []
    for match in FENCE.finditer(text):
        marker = MARKER.search(text, 0, match.start())
        program = marker.group(1) if marker and marker.end() == match.start() else None
        line = text.count("\n", 0, match.start()) + 2
        found.append(Block(match.group(1), line, match.group(2), program))
    return found


def programs() -> dict[str, list[Block]]:
    grouped: dict[str, list[Block]] = {}
    for block in blocks(README):
        if block.program is not None:
            assert block.lang == "python", f"README line {block.line}: only python blocks run"
            grouped.setdefault(block.program, []).append(block)
    return grouped


def expected_prints(source: str) -> list[str]:
    """The trailing comments of `print(...)` lines, in order."""
    expected = []
    lines: dict[int, list[tokenize.TokenInfo]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        lines.setdefault(tok.start[0], []).append(tok)
    for toks in lines.values():
        significant = [t for t in toks if t.type not in (tokenize.INDENT, tokenize.DEDENT)]
        comments = [t for t in significant if t.type == tokenize.COMMENT]
        if significant and significant[0].string == "print" and comments:
            expected.append(comments[-1].string.removeprefix("#").strip())
    return expected


def test_readme_has_runnable_programs() -> None:
    assert {"video", "api"} <= set(programs())


def test_every_python_block_compiles() -> None:
    for path in (README, ARCHITECTURE):
        for block in blocks(path):
            if block.lang == "python":
                source = "\n" * (block.line - 1) + block.source
                compile(source, str(path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


@pytest.mark.parametrize("program", sorted(programs()))
async def test_readme_program_runs(program: str, services: Services, tmp_path: Path) -> None:
    code = programs()[program]
    namespace = f"t{secrets.token_hex(5)}"
    settings = Settings(
        amqp_url=services.amqp_url, redis_url=services.redis_url, namespace=namespace
    )
    script = tmp_path / "blocks.json"
    script.write_text(json.dumps([[b.line, b.source] for b in code]))
    env = dict(os.environ)
    env.update(
        CONVEYOR_AMQP_URL=services.amqp_url,
        CONVEYOR_REDIS_URL=services.redis_url,
        CONVEYOR_NAMESPACE=namespace,
    )
    try:
        done = await _run([sys.executable, "-c", RUNNER, str(script)], env)
    finally:
        await purge_namespace(settings)
    assert done.returncode == 0, f"README program {program!r} failed:\n{done.stderr}"
    wanted = [line for block in code for line in expected_prints(block.source)]
    assert wanted, f"README program {program!r} shows no output to check"
    assert done.stdout.splitlines() == wanted


async def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import asyncio

    return await asyncio.to_thread(
        subprocess.run, argv, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=90
    )


def shell_commands(path: Path) -> list[list[str]]:
    """`conveyor ...` commands in the shell blocks, as argv lists without the program."""
    commands = []
    for block in blocks(path):
        if block.lang not in ("sh", "bash", "console", "shell"):
            continue
        for line in block.source.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if "conveyor" in argv:
                commands.append(argv[argv.index("conveyor") + 1 :])
    return commands


def test_readme_commands_parse_with_the_cli() -> None:
    commands = shell_commands(README)
    assert {argv[0] for argv in commands} >= {"worker", "trigger", "runs"}
    for argv in commands:
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            raise AssertionError(f"the CLI rejects `conveyor {shlex.join(argv)}`") from exc


def settings_table() -> dict[str, str]:
    rows = re.findall(r"^\| `CONVEYOR_(\w+)` \| `([^`]*)` \|", README.read_text(), re.MULTILINE)
    return {name.lower(): default for name, default in rows}


def test_readme_documents_every_setting_with_its_default() -> None:
    table = settings_table()
    defaults = Settings()
    assert set(table) == set(Settings.__struct_fields__), "document every setting, no others"
    for field, text in table.items():
        documented = msgspec.convert({field: text}, Settings, strict=False)
        assert getattr(documented, field) == getattr(defaults, field), f"default of {field}"


def test_readme_names_the_public_api() -> None:
    text = README.read_text()
    names: list[Any] = [
        "task",
        "step",
        "run_step",
        "Retry",
        "NonRetryableError",
        "RunFailed",
        "Client",
        "current_run",
        "trigger",
        "options",
        "batch_trigger",
        "result",
        "status",
        "cancel",
        "get_run",
    ]
    for name in names:
        assert re.search(rf"\b{name}\b", text), f"README does not mention {name}"


def test_links_between_docs_resolve() -> None:
    for path in (README, ARCHITECTURE):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.name} links to missing {target}"


def test_architecture_has_a_performance_section() -> None:
    text = ARCHITECTURE.read_text()
    assert re.search(r"^## Performance", text, re.MULTILINE)
    assert "benchmarks throughput" in text
    assert "benchmarks/results/latest.md" in text
