"""`python -m benchmarks ladder`: the delay ladder on classic and on quorum queues, side
by side in one run (issue 7, item 5; the figures are in docs/architecture.md).

For each kind, in a namespace of its own, in turn:
- declare: the base topology declared in a fresh namespace (what every test pays), then
  declared again (what each later client or worker pays), and deleted;
- idle: one message at a time with a 0.5 s (2 hops) or 1.5 s (4 hops) delay: how late
  it arrives;
- raw: MESSAGES persistent messages published with confirms (500 in flight) into the
  ladder with one delay and consumed from a queue bound to the delivery exchange:
  messages per second beyond the delay, and how late they arrive (p50 / p99);
- delayed runs: RUNS conveyor runs triggered with `delay=` through one in-process worker;
- retries: RUNS runs that fail their first attempt and retry after the same delay.
Runs per second are RUNS / (first trigger to last completion - the delay).

The classic kind is the ladder earlier versions declared (classic queues, dead-lettering
at most once), swapped in for `ladder_queue_arguments` while it is measured. Only
services on 127.0.0.1 are used; everything is deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import aio_pika
import msgspec

from benchmarks.throughput import check_local, pct, run_main
from conveyor import Client, Retry, Settings, current_run, task
from conveyor.broker import topology
from conveyor.broker.delay import UNIT_MS, delay_routing_key, entry_level
from conveyor.broker.purge import purge_namespace
from conveyor.worker import Worker

KINDS = ("classic", "quorum")
SINK = "sink"

_done: dict[str, asyncio.Future[None]] = {}
_left: dict[str, int] = {}


def _completed(queue: str) -> None:
    _left[queue] -= 1
    if not _left[queue]:
        _done[queue].set_result(None)


@task(id="bench-delayed")
async def delayed() -> None:
    _completed("bench-delayed")


@task(id="bench-retried", retry=Retry(max_attempts=2, min_delay=0.5, jitter=False))
async def retried() -> None:
    if current_run().attempt == 1:
        raise RuntimeError("the first attempt fails")
    _completed("bench-retried")


_quorum_level_arguments = topology.ladder_queue_arguments


def classic_level_arguments(
    names: topology.Names, level: int
) -> dict[str, aio_pika.abc.FieldValue]:
    """The queue arguments of a level of the classic ladder of earlier versions."""
    quorum = _quorum_level_arguments(names, level)
    return {k: quorum[k] for k in ("x-message-ttl", "x-dead-letter-exchange")}


@contextmanager
def ladder_of(kind: str) -> Iterator[None]:
    if kind == "classic":
        topology.ladder_queue_arguments = classic_level_arguments
    try:
        yield
    finally:
        topology.ladder_queue_arguments = _quorum_level_arguments


def _settings(base: Settings) -> Settings:
    return msgspec.structs.replace(base, namespace=f"bench{secrets.token_hex(4)}")


async def measure_declare(settings: Settings) -> dict[str, float]:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        started = time.perf_counter()
        await topology.Topology(settings).declare_base(channel)
        first = time.perf_counter() - started
        started = time.perf_counter()
        await topology.Topology(settings).declare_base(channel)
        again = time.perf_counter() - started
        started = time.perf_counter()
        await topology.Topology(settings).delete(channel, [])
        deleted = time.perf_counter() - started
    return {"declare ms": first * 1000, "again ms": again * 1000, "delete ms": deleted * 1000}


async def measure_idle(settings: Settings) -> dict[str, float]:
    """One message at a time on an otherwise idle ladder: how late it arrives."""
    late: dict[float, list[float]] = {0.5: [], 1.5: []}
    for _ in range(3):
        for delay, seen in late.items():
            seen.append((await measure_raw(settings, 1, delay))["late p50 ms"])
    return {f"{delay} s late ms": statistics.median(seen) for delay, seen in late.items()}


async def measure_raw(settings: Settings, messages: int, delay: float) -> dict[str, float]:
    names = topology.Names(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await topology.Topology(settings).declare_base(channel)
        sink = await channel.declare_queue(names.queue(SINK), durable=True)
        await sink.bind(names.delay_deliver, "#")
        delay_ms = round(delay * 1000)
        entry = await channel.get_exchange(names.delay_level(entry_level(delay_ms)), ensure=False)
        key = delay_routing_key(delay_ms, SINK)
        late: list[float] = []
        done = asyncio.get_running_loop().create_future()

        async def arrived(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            late.append(time.time() - float(message.body) - delay)
            await message.ack()
            if len(late) == messages and not done.done():
                done.set_result(None)

        consumer_channel = await connection.channel()
        await consumer_channel.set_qos(prefetch_count=500)
        consumer_sink = await consumer_channel.get_queue(sink.name, ensure=False)
        await consumer_sink.consume(arrived)
        started = time.perf_counter()
        for first in range(0, messages, 500):
            await asyncio.gather(
                *(
                    entry.publish(
                        aio_pika.Message(
                            str(time.time()).encode(),
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        key,
                        mandatory=True,
                    )
                    for _ in range(min(500, messages - first))
                )
            )
        published = time.perf_counter() - started
        await asyncio.wait_for(done, timeout=120 + delay)
        elapsed = time.perf_counter() - started
    return {
        "msgs/s": messages / max(elapsed - delay, 1e-9),
        "publish s": published,
        "late p50 ms": pct(late, 50) * 1000,
        "late p99 ms": pct(late, 99) * 1000,
    }


async def measure_runs(settings: Settings, runs: int, which: Any) -> dict[str, float]:
    queue = which.queue
    _left[queue] = runs
    _done[queue] = asyncio.get_running_loop().create_future()
    async with Client(settings=settings) as client:
        worker = Worker([delayed, retried], settings=settings, concurrency=100)
        await worker.start()
        try:
            bound = which.options(delay=0.5) if which is delayed else which
            await client.connect()
            started = time.perf_counter()
            for first in range(0, runs, 256):
                await asyncio.gather(*(bound.trigger() for _ in range(min(256, runs - first))))
            await asyncio.wait_for(_done[queue], timeout=120)
            elapsed = time.perf_counter() - started
        finally:
            await worker.shutdown()
    return {"runs/s": runs / max(elapsed - 0.5, 1e-9), "seconds": elapsed}


async def run(args: argparse.Namespace) -> int:
    base = Settings.from_env()
    check_local(base.amqp_url, "CONVEYOR_AMQP_URL")
    check_local(base.redis_url, "CONVEYOR_REDIS_URL")
    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    for repeat in range(args.repeats):
        for kind in KINDS if repeat % 2 == 0 else KINDS[::-1]:
            with ladder_of(kind):
                for name, measure in (
                    ("declare", lambda s: measure_declare(s)),
                    ("idle", measure_idle),
                    ("raw", lambda s: measure_raw(s, args.messages, 0.5)),
                    ("delayed runs", lambda s: measure_runs(s, args.runs, delayed)),
                    ("retries", lambda s: measure_runs(s, args.runs, retried)),
                ):
                    settings = _settings(base)
                    try:
                        figures = await measure(settings)
                    finally:
                        await purge_namespace(settings, [SINK, delayed.queue, retried.queue])
                    print(f"{kind:8} {name:13} {_line(figures)}", flush=True)
                    for k, v in figures.items():
                        results.setdefault((name, kind), {}).setdefault(k, []).append(v)
    print(f"\nmedians of {args.repeats} repeats (delay 0.5 s = {500 // UNIT_MS} units, 2 hops):")
    for (name, kind), figures in sorted(results.items()):
        print(
            f"  {name:13} {kind:8} {_line({k: statistics.median(v) for k, v in figures.items()})}"
        )
    return 0


def _line(figures: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in figures.items())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks ladder", description=__doc__)
    parser.add_argument("--messages", type=int, default=10_000, help="raw messages per pass")
    parser.add_argument("--runs", type=int, default=2_000, help="runs per pass")
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main("ladder benchmark", run(parse_args(argv)))
