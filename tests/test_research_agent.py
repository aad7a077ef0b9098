"""examples/research_agent.py (issue 9's demo): parallel tool calls as child runs, a flaky
tool retried, a sleep between rounds, and an approval token completed through the CLI."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

from tests.conftest import ROOT, Services
from tests.test_demo import assert_namespace_gone


def _run(services: Services) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(CONVEYOR_AMQP_URL=services.amqp_url, CONVEYOR_REDIS_URL=services.redis_url)
    env.pop("CONVEYOR_NAMESPACE", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "research_agent.py")],
        env=env,
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_the_research_agent_demo(services: Services) -> None:
    done = await asyncio.to_thread(_run, services)
    out = done.stdout
    assert done.returncode == 0, f"demo failed:\n{out}\n{done.stderr}"
    assert re.search(r"^token tok_\w+ completed$", out, re.M), out
    assert "'approval': {'approved': True}" in out
    tree = re.findall(r"^  run_\w+  (\S+)  (\w+)$", out, re.M)
    assert tree == [("search-web", "COMPLETED")] * 5 + [("summarize", "COMPLETED")], out
    assert "attempts of the agent: WAITING, WAITING, WAITING, WAITING, WAITING, COMPLETED" in out
    assert re.search(
        r"retried tool call \{'query': 'history of conveyor belts'\}: FAILED \(ConnectionError", out
    ), out
    match = re.search(r"namespace '([\w-]+)' removed", out)
    assert match, out
    await assert_namespace_gone(services, match.group(1))
