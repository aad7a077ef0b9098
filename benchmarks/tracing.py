"""What tracing costs a worker: drains with tracing off, on with a no-op exporter, and on
with export over OTLP/HTTP to a receiver on 127.0.0.1, side by side.

    .venv/bin/python -m benchmarks tracing [--runs 10000] [--rounds 3] [--json FILE]

One real worker process per drain (`conveyor worker benchmarks.tasks`), the runs
triggered untraced before it starts: no-op runs, then runs of ten checkpointed steps
(a span per step when on). The modes take turns round after round, so slow drifts of
the machine hit all alike; the median of the rounds is reported.

- off: no OTEL_* variables: no tracer provider, conveyor makes no spans.
- no-op exporter: the SDK with a BatchSpanProcessor whose exporter drops every batch
  (benchmarks/tasks.py installs it when CONVEYOR_BENCH_TRACING=noop): the cost of making
  the spans.
- OTLP: OTEL_EXPORTER_OTLP_ENDPOINT at benchmarks/otlp.py's receiver (which counts the
  requests and bytes, without decoding them): making, encoding and sending them.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks.otlp import Receiver
from benchmarks.tasks import noop, steps
from benchmarks.throughput import (
    QUICK,
    STEPS_PER_RUN,
    Bench,
    BenchError,
    _write_json,
    check_local,
    cleanup,
    run_main,
)
from conveyor import Settings

MODES = ("off", "no-op exporter", "OTLP")


def _env(mode: str, receiver: Receiver) -> dict[str, str]:
    if mode == "no-op exporter":
        return {"CONVEYOR_BENCH_TRACING": "noop"}
    if mode == "OTLP":
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "bench"}
    return {}


async def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env(namespace=f"bench{secrets.token_hex(4)}")
    check_local(settings.amqp_url, "CONVEYOR_AMQP_URL")
    check_local(settings.redis_url, "CONVEYOR_REDIS_URL")
    if args.runs < 1000 or args.rounds < 1:
        raise BenchError("--runs takes at least 1000 and --rounds at least 1")
    print(
        f"tracing benchmark: namespace {settings.namespace}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    bench = Bench(settings, QUICK, args.concurrency)
    results: dict[str, dict[str, list[float]]] = {
        m: {"noop": [], "steps": [], "cpu_noop": []} for m in MODES
    }
    step_runs = max(200, args.runs // 5)
    with Receiver(keep=False) as receiver:
        try:
            await bench.open()
            for round_ in range(args.rounds):
                for mode in MODES:
                    env = _env(mode, receiver)
                    drained = await bench.drain(1, noop, [{}] * args.runs, None, env)
                    items = [{"n": STEPS_PER_RUN}] * step_runs
                    stepped = await bench.drain(1, steps, items, None, env)
                    results[mode]["noop"].append(drained["runs_per_s"])
                    results[mode]["cpu_noop"].append(drained["cpu_us_per_run"]["workers"])
                    results[mode]["steps"].append(stepped["runs_per_s"])
                    print(
                        f"  round {round_ + 1}, {mode}: no-op {drained['runs_per_s']:,.0f} "
                        f"runs/s, steps({STEPS_PER_RUN}) {stepped['runs_per_s']:,.0f} runs/s",
                        flush=True,
                    )
        finally:
            try:
                await bench.close()
            finally:
                await cleanup(settings)
        exported = (receiver.requests, receiver.bytes)
    print(report(results, args.runs, step_runs, exported))
    if args.json:
        _write_json(
            args.json,
            {"runs": args.runs, "step_runs": step_runs, "rounds": results, "otlp": exported},
        )
    return 0


def report(
    results: dict[str, dict[str, list[float]]], runs: int, step_runs: int, exported: Any
) -> str:
    off_noop = statistics.median(results["off"]["noop"])
    off_steps = statistics.median(results["off"]["steps"])
    lines = [
        "",
        f"one worker process, median of {len(results['off']['noop'])} rounds "
        f"({runs:,} no-op runs, {step_runs:,} runs of {STEPS_PER_RUN} steps per drain)",
        "",
        f"{'':<16}{'no-op runs/s':>14}{'vs off':>9}{'worker us/run':>15}"
        f"{'steps(10) runs/s':>18}{'vs off':>9}",
    ]
    for mode in MODES:
        r = results[mode]
        noop_rate, step_rate = statistics.median(r["noop"]), statistics.median(r["steps"])
        lines.append(
            f"{mode:<16}{noop_rate:>14,.0f}{noop_rate / off_noop - 1:>+9.0%}"
            f"{statistics.median(r['cpu_noop']):>15,.0f}"
            f"{step_rate:>18,.0f}{step_rate / off_steps - 1:>+9.0%}"
        )
    lines.append(
        f"\nOTLP receiver: {exported[0]:,} export requests, {exported[1] / 1e6:,.1f} MB in all"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks tracing", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", type=int, default=10_000, help="no-op runs per drain")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three modes")
    parser.add_argument("--concurrency", type=int, default=100, help="per worker (default 100)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return run_main("tracing benchmark", run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
