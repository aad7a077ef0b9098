"""The demo: a three-step video pipeline that survives a failure without redoing work.

`./dev demo` runs this file. It starts a worker in this process, in a namespace of its
own, triggers `process-video` for three videos and prints what each run did. The
transcoder fails on every run's first attempt (an injected, transient error); the retry
resumes after the last completed step, so each video is downloaded once.

The steps are simulated on local files under a work directory: "download" writes the
source video, "transcode" writes a converted copy, "upload" copies it into a folder that
stands in for a CDN and returns the URL it would have.

`conveyor worker examples.video_pipeline` (the worker in compose.yaml) runs the same task.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import uvloop

from conveyor import Client, Retry, Run, Settings, current_run, step, task

# Where the simulated files go; the demo points it at a fresh temporary directory.
WORKDIR_ENV = "VIDEO_DEMO_DIR"
VIDEOS = ["s3://in/intro.mp4", "s3://in/keynote.mp4", "s3://in/outro.mp4"]


def workdir() -> Path:
    return Path(os.environ.get(WORKDIR_ENV) or Path(tempfile.gettempdir(), "conveyor-video-demo"))


def run_dir() -> Path:
    path = workdir() / "runs" / current_run().id
    path.mkdir(parents=True, exist_ok=True)
    return path


def note(step_name: str) -> None:
    """Record that a step's code ran in this attempt, so the demo can count executions."""
    with (run_dir() / "events").open("a") as events:
        events.write(f"{step_name} {current_run().attempt}\n")


@step()
async def download(video_url: str) -> str:
    note("download")
    await asyncio.sleep(0.05)  # the network
    source = run_dir() / Path(video_url).name
    source.write_bytes(f"frames of {video_url}\n".encode() * 1000)
    return str(source)


@step()
async def transcode(source: str) -> str:
    note("transcode")
    if current_run().attempt == 1:
        raise ConnectionError("transcoder unavailable (injected on the first attempt)")
    await asyncio.sleep(0.05)  # the encoder
    return await asyncio.to_thread(convert, Path(source))


def convert(source: Path) -> str:
    output = source.with_suffix(".h264.mp4")
    output.write_bytes(source.read_bytes().upper())
    return str(output)


@step()
async def upload(path: str) -> str:
    note("upload")
    cdn = workdir() / "cdn"
    cdn.mkdir(parents=True, exist_ok=True)
    name = Path(path).name
    shutil.copyfile(path, cdn / name)
    return f"https://cdn.example.com/videos/{name}"


@task(
    id="process-video",
    retry=Retry(max_attempts=3, factor=2.0, min_delay=0.5, max_delay=5.0, jitter=False),
)
async def process_video(video_url: str) -> dict[str, str]:
    local = await download(video_url)  # checkpointed when it returns
    out = await transcode(local)  # fails once; the retry resumes here, no re-download
    return {"cdn_url": await upload(out)}


# -- the demo -------------------------------------------------------------------------


def executed(run_id: str) -> dict[int, list[str]]:
    """Which steps' code ran in each attempt of a run, from the events the steps wrote."""
    by_attempt: dict[int, list[str]] = {}
    events = workdir() / "runs" / run_id / "events"
    for line in events.read_text().splitlines() if events.exists() else []:
        name, attempt = line.split()
        by_attempt.setdefault(int(attempt), []).append(name)
    return by_attempt


def report(run: Run) -> bool:
    """Print one run; True when it went as the demo expects."""
    ran = executed(run.id)
    url = run.output["cdn_url"] if run.status.value == "COMPLETED" else "-"
    print(f"\n{run.id}  {run.payload['video_url']} -> {run.status.value} {url}")
    for attempt in run.attempts:
        steps = ran.get(attempt.number, [])
        line = f"  attempt {attempt.number}  {attempt.status:<9}  ran {', '.join(steps) or '-'}"
        if attempt.error:
            line += f": {attempt.error}"
        elif attempt.number > 1:
            restored = [s for s in run.steps if s.split("#")[0] not in steps]
            line += f"; restored from checkpoints: {', '.join(restored) or '-'}"
        print(line)
    downloads = sum(steps.count("download") for steps in ran.values())
    print(f"  checkpoints: {', '.join(run.steps)}   downloads: {downloads}")
    return run.status.value == "COMPLETED" and downloads == 1 and len(run.attempts) == 2


async def demo(settings: Settings) -> bool:
    from conveyor.worker import Worker

    async with (
        Client(settings=settings) as client,
        Worker([process_video], settings=settings, concurrency=10),
    ):
        print(
            f"conveyor demo: worker running in this process, namespace {settings.namespace!r}\n"
            f"triggering {process_video.id} for {len(VIDEOS)} videos; "
            "transcode fails on each run's first attempt, on purpose"
        )
        handles = await process_video.batch_trigger([{"video_url": v} for v in VIDEOS])
        await asyncio.gather(*(h.result(timeout=60) for h in handles))
        runs = [await client.get_run(h.id) for h in handles]
    ok = all([report(run) for run in runs])
    if ok:
        print(
            f"\nall {len(runs)} runs COMPLETED on attempt 2; every video was downloaded once: "
            "the retry resumed after the download's checkpoint"
        )
    else:
        print("\nUNEXPECTED: a run did not go as described above", file=sys.stderr)
    return ok


async def main() -> int:
    from conveyor.broker.purge import purge_namespace

    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    settings = Settings.from_env(namespace=f"demo-{secrets.token_hex(4)}")
    with tempfile.TemporaryDirectory(prefix="conveyor-demo-") as tmp:
        os.environ[WORKDIR_ENV] = tmp
        try:
            ok = await demo(settings)
        except (OSError, ConnectionError) as exc:
            print(
                f"cannot reach RabbitMQ ({settings.amqp_url}) or Redis ({settings.redis_url}): "
                f"{exc!r}\nstart them, or set CONVEYOR_AMQP_URL and CONVEYOR_REDIS_URL "
                "(`./dev demo` starts local servers)",
                file=sys.stderr,
            )
            return 2
        finally:
            try:
                await purge_namespace(settings, [process_video.queue])
            except (OSError, ConnectionError) as exc:
                print(f"could not clean up namespace {settings.namespace}: {exc!r}")
    print(f"namespace {settings.namespace!r} removed from RabbitMQ and Redis")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))
