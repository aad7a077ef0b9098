"""Client-side counters of Redis and AMQP round trips, for the benchmark's counting pass.

Server-side statistics (Redis INFO commandstats) also count the commands run inside Lua
scripts and every other client's traffic, so they cannot tell how often conveyor talks to
Redis. These counters wrap redis-py and aiormq in one process instead and count what that
process sends. They are installed only when asked (the counting pass sets
CONVEYOR_BENCH_COUNT for its worker; the benchmark installs them in itself), never during
the timed measurements.

Keys of `counts`:
  redis <CMD>            a command sent on its own: one round trip
  redis pipeline         one pipeline sent: one round trip
  redis in-pipeline <CMD>  a command carried by a pipeline (no round trip of its own)
  amqp publish           basic.publish (aiormq's, or a message framed by conveyor's publisher);
                         on a confirm channel the confirm makes it a round trip
  amqp deliver           basic.deliver received from the broker (no reply)
  amqp ack / nack        basic.ack / basic.nack sent (no reply)
  amqp rpc <Method>      a synchronous AMQP method (declare, bind, qos, consume ...): a round trip
"""

from __future__ import annotations

import atexit
import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

counts: Counter[str] = Counter()
_installed = False


def _name(raw: Any) -> str:
    if isinstance(raw, bytes):
        raw = raw.decode()
    return str(raw).upper()


def install() -> None:
    """Wrap the methods that send Redis commands and AMQP frames (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    _wrap_redis()
    _wrap_batcher()
    _wrap_aiormq()
    _wrap_publisher()


def install_if_asked() -> None:
    """In a worker process: count when CONVEYOR_BENCH_COUNT names a file, and write the
    counts there on exit."""
    path = os.environ.get("CONVEYOR_BENCH_COUNT")
    if path:
        install()
        atexit.register(dump, path)


def reset() -> None:
    counts.clear()


def snapshot() -> dict[str, int]:
    return dict(counts)


def dump(path: str) -> None:
    Path(path).write_text(json.dumps(snapshot(), sort_keys=True))


def _wrap_redis() -> None:
    from redis.asyncio.client import Pipeline, Redis

    execute_command: Callable[..., Any] = Redis.execute_command

    async def counted_execute_command(self: Any, *args: Any, **options: Any) -> Any:
        counts[f"redis {_name(args[0])}"] += 1
        return await execute_command(self, *args, **options)

    immediate: Callable[..., Any] = Pipeline.immediate_execute_command

    async def counted_immediate(self: Any, *args: Any, **options: Any) -> Any:
        # redis-py sends SCRIPT EXISTS this way before every pipeline that carries a script.
        counts[f"redis {_name(args[0])}"] += 1
        return await immediate(self, *args, **options)

    execute: Callable[..., Any] = Pipeline.execute

    async def counted_execute(self: Any, raise_on_error: bool = True) -> Any:
        if self.command_stack:
            counts["redis pipeline"] += 1
            for args, _options in self.command_stack:
                counts[f"redis in-pipeline {_name(args[0])}"] += 1
        return await execute(self, raise_on_error)

    Redis.execute_command = counted_execute_command  # type: ignore[method-assign]
    Pipeline.immediate_execute_command = counted_immediate  # type: ignore[method-assign]
    Pipeline.execute = counted_execute  # type: ignore[method-assign]


def _wrap_batcher() -> None:
    """conveyor's hot-path batcher: each loop turn's batch is one round trip shared by the
    commands it carries."""
    from conveyor.shared.batcher import CommandBatcher

    round_trip: Callable[..., Any] = CommandBatcher._round_trip

    async def counted_round_trip(self: Any, commands: list[tuple[Any, ...]]) -> Any:
        counts["redis pipeline"] += 1
        for command in commands:
            counts[f"redis in-pipeline {_name(command[0])}"] += 1
        return await round_trip(self, commands)

    CommandBatcher._round_trip = counted_round_trip  # type: ignore[method-assign]


def _wrap_aiormq() -> None:
    from aiormq.channel import Channel

    def counting(key: str, original: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            counts[key] += 1
            return await original(self, *args, **kwargs)

        return wrapper

    rpc: Callable[..., Any] = Channel.rpc

    async def counted_rpc(self: Any, frame: Any, *args: Any, **kwargs: Any) -> Any:
        counts[f"amqp rpc {frame.name}"] += 1
        return await rpc(self, frame, *args, **kwargs)

    Channel.rpc = counted_rpc  # type: ignore[method-assign]
    Channel.basic_publish = counting("amqp publish", Channel.basic_publish)  # type: ignore[method-assign]
    Channel.basic_ack = counting("amqp ack", Channel.basic_ack)  # type: ignore[method-assign]
    Channel.basic_nack = counting("amqp nack", Channel.basic_nack)  # type: ignore[method-assign]
    Channel.basic_reject = counting("amqp reject", Channel.basic_reject)  # type: ignore[method-assign]
    Channel._on_deliver_frame = counting("amqp deliver", Channel._on_deliver_frame)  # type: ignore[method-assign]


def _wrap_publisher() -> None:
    """conveyor's publisher frames its messages itself, without aiormq's basic_publish:
    count each message it numbers for a confirm."""
    from conveyor.broker.publisher import _Tally

    register: Callable[..., None] = _Tally.register

    def counted_register(self: Any, *args: Any, **kwargs: Any) -> None:
        counts["amqp publish"] += len(self.messages)
        register(self, *args, **kwargs)

    _Tally.register = counted_register  # type: ignore[method-assign]
