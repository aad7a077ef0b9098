"""The comparison benchmark runs end to end: every scenario once, at a tiny size, for
every system, and leaves nothing behind. Its figures are not checked (a test is no place
for timing); `python -m benchmarks compare` is the benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import aio_pika
import pytest
import redis.asyncio as aioredis

from tests.conftest import ROOT, Services

SYSTEMS = ["conveyor", "celery", "dramatiq", "taskiq"]
PEERS = SYSTEMS[1:]


def compare(
    services: Services, *args: str, timeout: float = 280
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CONVEYOR_AMQP_URL": services.amqp_url,
        "CONVEYOR_REDIS_URL": services.redis_url,
    }
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", "compare", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(300)
async def test_every_scenario_runs_for_every_system(services: Services, tmp_path: Path) -> None:
    done = compare(services, "--smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    data = json.loads((tmp_path / "latest.json").read_text())
    measured = {(r["scenario"], r["system"], r["variant"]) for r in data["results"]}
    for system in SYSTEMS:
        assert ("drain", system, "1 worker") in measured
        assert ("drain", system, "2 workers") in measured
        assert ("chain", system, "1 worker") in measured
        assert ("fanout", system, "1 worker") in measured
        assert any(s == "latency" and name == system for s, name, _ in measured)
    for peer in PEERS:
        assert ("drain", peer, "1 worker, result backend") in measured
    for queue_type in ("classic", "quorum"):
        assert ("raw-amqp", "aio-pika", queue_type) in measured
        assert ("latency", "aio-pika", queue_type) in measured
    assert ("raw-redis", "redis-py", "pipelined HSET") in measured
    fanouts = [r["figures"] for r in data["results"] if r["scenario"] == "fanout"]
    assert all(f["children_per_s"] > 0 and f["collect_ms"] >= 0 for f in fanouts)

    text = (tmp_path / "latest.md").read_text()
    for heading in (
        "## Targets",
        "## Drain",
        "## Enqueue",
        "## Latency",
        "## Three steps",
        "## Fan-out",
    ):
        assert heading in text
    assert "fan-out: conveyor >= 3x the best peer" in text
    assert (tmp_path / "latest.png").read_bytes().startswith(b"\x89PNG")
    assert "Targets (ratios of medians from this run)" in done.stdout

    await _assert_nothing_left(services, data["namespace"])


async def _assert_nothing_left(services: Services, namespace: str) -> None:
    r = aioredis.Redis.from_url(services.redis_url)
    try:
        assert [k async for k in r.scan_iter(match=f"{namespace}:*")] == []
    finally:
        await r.aclose()
    connection = await aio_pika.connect(services.amqp_url)
    async with connection:
        for queue in (
            f"{namespace}.celery",
            f"{namespace}.dramatiq",
            f"{namespace}.taskiq",
            f"{namespace}.raw.quorum",
            f"{namespace}.cmp-noop",
            f"{namespace}.cmp-fanout-child",
        ):
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(queue, passive=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--systems", "conveyor,rq"],
            "--systems takes some of conveyor, celery, dramatiq, taskiq",
        ),
        (["--workers", "2,x"], "--workers takes process counts from 1 to 8 starting with 1"),
        (["--repeats", "0"], "--repeats takes 1 or more"),
    ],
)
def test_bad_arguments_get_a_clear_error(
    services: Services, tmp_path: Path, args: list[str], message: str
) -> None:
    done = compare(services, "--smoke", *args, "--out", str(tmp_path))
    assert done.returncode == 1
    assert message in done.stderr
    assert not (tmp_path / "latest.md").exists()


def test_the_committed_results_are_quoted_in_the_readme() -> None:
    results = ROOT / "benchmarks" / "results"
    text = (results / "latest.md").read_text()
    assert (results / "latest.png").read_bytes().startswith(b"\x89PNG")
    readme = (ROOT / "README.md").read_text()
    assert "benchmarks/results/latest.md" in readme
    quoted = [line for line in readme.splitlines() if line.startswith("| ") and "x |" in line]
    assert quoted, "the README quotes no headline ratios"
    for line in quoted:
        ratio = line.rstrip(" |").rsplit("|", 1)[1].strip()
        assert ratio in text, f"README quotes {ratio}, which benchmarks/results/latest.md lacks"


LADDER_SMOKE = ["--messages", "200", "--runs", "50", "--repeats", "1"]


def test_the_ladder_benchmark_runs_both_kinds(services: Services) -> None:
    env = {
        **os.environ,
        "CONVEYOR_AMQP_URL": services.amqp_url,
        "CONVEYOR_REDIS_URL": services.redis_url,
    }
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "ladder", *LADDER_SMOKE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    medians = done.stdout.split("medians of 1 repeats", 1)[1]
    for name in ("declare", "idle", "raw", "delayed runs", "retries"):
        for kind in ("classic", "quorum"):
            assert f"{name:13} {kind:8}" in medians


def test_the_schedules_benchmark_runs(services: Services) -> None:
    env = {
        **os.environ,
        "CONVEYOR_AMQP_URL": services.amqp_url,
        "CONVEYOR_REDIS_URL": services.redis_url,
    }
    argv = ["schedules", "--schedules", "50", "--cron", "* * * * * *", "--seconds", "3"]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "50 schedules '* * * * * *', 3 s: scheduler CPU" in done.stdout
    assert "ticks fired in" in done.stdout


def run_limits(services: Services, out: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CONVEYOR_AMQP_URL": services.amqp_url,
        "CONVEYOR_REDIS_URL": services.redis_url,
    }
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", "limits", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )


async def test_the_limits_benchmark_runs(services: Services, tmp_path: Path) -> None:
    out = tmp_path / "limits.md"
    done = run_limits(services, out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    for heading in ("## Rate accuracy", "## Drain with a concurrency limit", "## Round trips"):
        assert heading in text
    for label in ("200/s, burst 20", "20/s, burst 20", "no limit", "concurrency 50"):
        assert f"| {label} |" in text
    namespace = done.stdout.split("namespace ", 1)[1].split(",", 1)[0]
    r = aioredis.Redis.from_url(services.redis_url)
    try:
        assert [k async for k in r.scan_iter(match=f"{namespace}:*")] == []
    finally:
        await r.aclose()
