"""examples/rate_limited_sync.py (issue 10's demo): a scheduled sync against a fake API that
answers 429; RateLimited pauses the task's rate limit, every item is synced once, no run
fails or spends a retry attempt, and far fewer 429s come back than without pausing."""

from __future__ import annotations

import ast
import asyncio
import re

from tests.conftest import ROOT, Services
from tests.test_demo import assert_namespace_gone, run_demo


async def test_the_rate_limited_sync_demo(services: Services) -> None:
    done = await asyncio.to_thread(run_demo, services, ROOT / "examples" / "rate_limited_sync.py")
    out = done.stdout
    assert done.returncode == 0, f"demo failed:\n{out}\n{done.stderr}"

    # Three ticks of the `every=3s` schedule, each fanning out 10 item runs that all completed.
    ticks = re.findall(
        r"^tick [\d:]{8}  cron:sync-catalog:0:(\d+)  COMPLETED  \{'synced': 10, 'failed': 0\}$",
        out,
        re.M,
    )
    assert len(ticks) == 3, out
    assert all(int(at) % 3000 == 0 for at in ticks), ticks
    assert "item runs: 30, synced: 30, synced twice: 0, not COMPLETED: 0" in out

    # Every 429 ended an attempt THROTTLED; none ended one FAILED (a spent retry attempt).
    match = re.search(r"^attempts: (\{.*\}); runs that spent an attempt on an error: 0$", out, re.M)
    assert match, out
    attempts = ast.literal_eval(match.group(1))
    assert attempts.get("COMPLETED") == 30 and set(attempts) <= {"COMPLETED", "THROTTLED"}
    match = re.search(
        r"^429s per item: ([\d.]+) with pausing \((\d+) for 30\), ([\d.]+) without \((\d+) for 10\)$",
        out,
        re.M,
    )
    assert match, out
    with_pausing, without = int(match.group(2)), int(match.group(4))
    assert attempts.get("THROTTLED", 0) == with_pausing
    assert without >= 3, "the loop without pausing should have drawn 429s"
    assert with_pausing / 30 < 0.5 * without / 10, out

    # The API's own account, second by second, agrees: 40 served (10 by the loop), and the
    # refusals it lists are those counted above.
    seconds = [
        (int(served), int(refused))
        for served, refused in re.findall(
            r"^  \+\d+s  served (\d+)  refused (\d+)  [ox]*$", out, re.M
        )
    ]
    assert sum(s for s, _ in seconds) == 40, out
    assert sum(r for _, r in seconds) == with_pausing + without, out
    assert all(s <= 5 for s, _ in seconds), "the API served more than its limit in a second"
    assert re.search(
        r"^a throttled run, as get_run shows it: sku-\d{6}-\d\d: rate limit of task "
        r"'sync-item' \(10 per 1s, burst 5\): starts at ",
        out,
        re.M,
    ), out

    match = re.search(r"namespace '([\w-]+)' removed", out)
    assert match, out
    await assert_namespace_gone(services, match.group(1), ("sync-catalog", "sync-item"))
