"""examples/research_agent.py (issue 9's demo): parallel tool calls as child runs, a flaky
tool retried, a sleep between rounds, and an approval token completed through the CLI."""

from __future__ import annotations

import asyncio
import re

from tests.conftest import ROOT, Services
from tests.test_demo import assert_namespace_gone, run_demo


async def test_the_research_agent_demo(services: Services) -> None:
    done = await asyncio.to_thread(run_demo, services, ROOT / "examples" / "research_agent.py")
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
