"""`python -m benchmarks compare`: every scenario for every system, interleaved and
repeated, then benchmarks/results/latest.md, a chart and the raw figures as JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from benchmarks.throughput import check_local, run_main

from . import raw, report, scenarios
from .apps.settings import AppSettings
from .cleanup import delete_namespace
from .machine import describe
from .processes import WorkerError
from .scenarios import ScenarioError, Stage
from .systems import SYSTEMS, System

RESULTS = Path(__file__).resolve().parents[1] / "results"


class Sizes(msgspec.Struct, frozen=True):
    drain: int  # no-op tasks per drain
    latency: int  # tasks of the latency phase
    rate: float  # tasks/s of the latency phase
    chains: int  # three-call chains per chain drain
    fanout: int  # children of the fan-out parent
    raw_messages: int  # messages of the raw publish/consume phase
    raw_hsets: int  # HSETs of the raw Redis phase
    repeats: int
    wait_timeout: float  # longest wait for one phase's tasks to run


SIZES = {
    "full": Sizes(20_000, 2_000, 200.0, 3_000, 1_000, 20_000, 100_000, 3, 180.0),
    # a fan-out of fewer children would time start-up more than the fan-out
    "quick": Sizes(2_000, 400, 200.0, 500, 1_000, 5_000, 20_000, 1, 60.0),
    "smoke": Sizes(20, 10, 100.0, 5, 10, 100, 1_000, 1, 60.0),
}


class Plan(msgspec.Struct, frozen=True):
    sizes: Sizes
    systems: list[str]
    workers: list[int]
    backend: bool


class Result(msgspec.Struct, frozen=True):
    scenario: str  # drain, latency, chain, fanout, raw-amqp, raw-redis
    system: str
    variant: str  # e.g. "1 worker", "2 workers, result backend", "quorum"
    repeat: int
    figures: dict[str, float]
    method: str = ""  # how the tasks were enqueued, where that differs between variants


class Run:
    def __init__(self, plan: Plan, settings: AppSettings, stamps: Path) -> None:
        self.plan = plan
        self.settings = settings
        self.systems: list[System] = [SYSTEMS[name](settings) for name in plan.systems]
        self.stage = Stage(stamps, plan.sizes.wait_timeout)
        self.results: list[Result] = []

    def add(
        self, scenario: str, system: str, variant: str, repeat: int, figures: Any, method: str = ""
    ) -> None:
        self.results.append(Result(scenario, system, variant, repeat, figures, method))
        shown = ", ".join(f"{k} {v:,.2f}" for k, v in figures.items())
        print(f"  {scenario:11} {system:9} {variant:26} {method:14} {shown}", flush=True)

    async def run(self) -> None:
        for system in self.systems:
            await system.open()
        for repeat in range(1, self.plan.sizes.repeats + 1):
            print(f"\n== repeat {repeat} of {self.plan.sizes.repeats}", flush=True)
            await self.repeat(repeat)

    async def repeat(self, repeat: int) -> None:
        sizes, stage = self.plan.sizes, self.stage
        for processes in self.plan.workers:
            label = f"{processes} worker" + ("s" if processes > 1 else "")
            for system in self.systems:
                fill = system.fills[0] if processes == 1 else system.fills[-1]
                figures = await scenarios.drain(
                    stage, system, count=sizes.drain, processes=processes, backend=False, fill=fill
                )
                self.add("drain", system.name, label, repeat, figures, method=fill)
                if processes == 1:
                    figures = await scenarios.latency(
                        stage, system, count=sizes.latency, rate=sizes.rate
                    )
                    self.add("latency", system.name, system.queue_type, repeat, figures)
                await stage.workers.stop()
        if self.plan.backend:
            for system in self.systems:
                if system.has_backend:
                    figures = await scenarios.drain(
                        stage,
                        system,
                        count=sizes.drain,
                        processes=1,
                        backend=True,
                        fill=system.fills[0],
                    )
                    self.add(
                        "drain",
                        system.name,
                        "1 worker, result backend",
                        repeat,
                        figures,
                        method=system.fills[0],
                    )
                    await stage.workers.stop()
        for system in self.systems:
            figures = await scenarios.chain(stage, system, count=sizes.chains)
            self.add("chain", system.name, "1 worker", repeat, figures)
            await stage.workers.stop()
        for system in self.systems:
            figures = await scenarios.fanout(stage, system, count=sizes.fanout)
            self.add("fanout", system.name, "1 worker", repeat, figures)
            await stage.workers.stop()
        for queue_type in raw.QUEUE_TYPES:
            figures = await raw.amqp_limits(self.settings, queue_type, sizes.raw_messages)
            self.add("raw-amqp", "aio-pika", queue_type, repeat, figures)
            figures = await raw.amqp_latency(self.settings, queue_type, sizes.latency, sizes.rate)
            self.add("latency", "aio-pika", queue_type, repeat, figures)
        figures = await raw.redis_limit(self.settings, sizes.raw_hsets)
        self.add("raw-redis", "redis-py", "pipelined HSET", repeat, figures)

    async def close(self) -> None:
        self.stage.workers.kill()
        for system in self.systems:
            try:
                await system.close()
            except Exception as exc:  # closing one must not keep the others open
                print(f"compare: closing {system.name}: {exc!r}", file=sys.stderr)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks compare", description=__doc__.split("\n")[0]
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, one repeat (< 2 min)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes: checks that all runs")
    parser.add_argument("--repeats", type=int, help="repeats of every scenario (full: 3)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="default: all")
    parser.add_argument("--workers", default="1,2", help="worker process counts (default 1,2)")
    parser.add_argument("--no-backend", action="store_true", help="skip the result-backend drains")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help=f"where latest.md goes (default {RESULTS})"
    )
    parser.add_argument("--timeout", type=float, help="give up after this many seconds")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    sizes = SIZES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.repeats is not None:
        if args.repeats < 1:
            raise ScenarioError("--repeats takes 1 or more")
        sizes = msgspec.structs.replace(sizes, repeats=args.repeats)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown or not systems:
        raise ScenarioError(f"--systems takes some of {', '.join(SYSTEMS)}; got {unknown or '-'}")
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        workers = []
    if not workers or workers[0] != 1 or max(workers) > 8:
        raise ScenarioError("--workers takes process counts from 1 to 8 starting with 1, e.g. 1,2")
    return Plan(sizes, systems, workers, backend=not args.no_backend)


async def run(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    settings = AppSettings(
        namespace=f"cmp{secrets.token_hex(4)}",
        amqp_url=os.environ.get("CONVEYOR_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        redis_url=os.environ.get("CONVEYOR_REDIS_URL", "redis://127.0.0.1:6379/0"),
        backend=False,
    )
    check_local(settings.amqp_url, "CONVEYOR_AMQP_URL")
    check_local(settings.redis_url, "CONVEYOR_REDIS_URL")
    timeout = args.timeout or {"full": 1500.0, "quick": 240.0, "smoke": 240.0}[_size_name(args)]
    machine = await describe(settings)
    print(
        f"compare: namespace {settings.namespace}, systems {', '.join(plan.systems)}, "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="conveyor-compare-") as stamps:
        bench = Run(plan, settings, Path(stamps))
        try:
            async with asyncio.timeout(timeout):
                await bench.run()
        finally:
            try:
                await bench.close()
            finally:
                await delete_namespace(settings, bench.systems)
    machine["load_average_end"] = round(os.getloadavg()[0], 2)
    machine["duration_s"] = round(time.monotonic() - started)
    data = {
        "namespace": settings.namespace,
        "machine": machine,
        "plan": msgspec.to_builtins(plan),
        "results": msgspec.to_builtins(bench.results),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(data, indent=1))
    text = report.markdown(data, chart="latest.png", analysis=RESULTS / "analysis.md")
    (args.out / "latest.md").write_text(text)
    report.chart(data, args.out / "latest.png")
    print("\n" + report.headline(data))
    print(f"\nwrote {args.out / 'latest.md'} and latest.png, latest.json beside it")
    return 0


def _size_name(args: argparse.Namespace) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main("compare", run(args), (ScenarioError, WorkerError))
