"""The README's first command runs examples/video_pipeline.py; it must work and say so."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import aio_pika
import redis.asyncio as aioredis
from aio_pika.exceptions import ChannelNotFoundEntity

from tests.conftest import ROOT, Services

DEMO = ROOT / "examples" / "video_pipeline.py"


def run_demo(services: Services, path: Path = DEMO) -> subprocess.CompletedProcess[str]:
    """Run an example as its README command does, against the test's services."""
    env = dict(os.environ)
    env.update(CONVEYOR_AMQP_URL=services.amqp_url, CONVEYOR_REDIS_URL=services.redis_url)
    env.pop("CONVEYOR_NAMESPACE", None)
    return subprocess.run(
        [sys.executable, str(path)],
        env=env,
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=90,
    )


async def test_demo_retries_transcode_without_downloading_again(services: Services) -> None:
    done = await asyncio.to_thread(run_demo, services)
    out = done.stdout
    assert done.returncode == 0, f"demo failed:\n{out}\n{done.stderr}"

    runs = re.findall(r"^run_\w+  (\S+) -> (\w+) (\S+)$", out, re.MULTILINE)
    assert len(runs) == 3, out
    assert {status for _, status, _ in runs} == {"COMPLETED"}
    assert all(url.startswith("https://cdn.example.com/videos/") for *_, url in runs)
    first = re.findall(
        r"^  attempt 1  FAILED     ran download, transcode: ConnectionError", out, re.M
    )
    second = re.findall(
        r"^  attempt 2  COMPLETED  ran transcode, upload; restored from checkpoints: download#0$",
        out,
        re.MULTILINE,
    )
    assert len(first) == len(second) == 3, out
    assert out.count("downloads: 1\n") == 3, out
    assert "every video was downloaded once" in out

    match = re.search(r"namespace '([\w-]+)' removed", out)
    assert match, out
    await assert_namespace_gone(services, match.group(1))


async def assert_namespace_gone(
    services: Services, namespace: str, queues: tuple[str, ...] = ("process-video",)
) -> None:
    r = aioredis.Redis.from_url(services.redis_url)
    try:
        left = [k async for k in r.scan_iter(match=f"{namespace}:*", count=1000)]
    finally:
        await r.aclose()
    assert left == [], f"the demo left Redis keys behind: {left[:5]}"
    connection = await aio_pika.connect(services.amqp_url)
    async with connection:
        names = [f"{namespace}.q.{queue}" for queue in queues]
        for name in [*names, f"{namespace}.ladder.0", f"{namespace}.dead"]:
            channel = await connection.channel()
            try:
                await channel.declare_queue(name, passive=True)
            except ChannelNotFoundEntity:
                continue
            raise AssertionError(f"the demo left queue {name} behind")
