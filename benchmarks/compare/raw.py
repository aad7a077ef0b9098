"""The raw limits: what aio-pika and redis-py do with nothing on top.

- confirmed publishes/s: persistent messages, publisher confirms, RAW_IN_FLIGHT awaiting
  their confirm at once (what a client with many concurrent callers can reach);
- consumes/s: the same messages consumed with a prefetch of PREFETCH, each acked;
- pipelined HSET/s: redis-py pipelines of REDIS_PIPELINE commands, one at a time;
- publish-to-consume latency at a steady rate, on a classic and on a quorum queue.
"""

from __future__ import annotations

import asyncio
import struct
import time

import aio_pika
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from benchmarks.throughput import pct

from .apps.settings import PREFETCH, AppSettings
from .scenarios import paced

RAW_IN_FLIGHT = 500
REDIS_PIPELINE = 1000
QUEUE_TYPES = ("classic", "quorum")


def raw_queue(settings: AppSettings, queue_type: str) -> str:
    return f"{settings.namespace}.raw.{queue_type}"


async def _declare(channel: AbstractChannel, name: str, queue_type: str) -> None:
    await channel.declare_queue(name, durable=True, arguments={"x-queue-type": queue_type})


async def amqp_limits(settings: AppSettings, queue_type: str, count: int) -> dict[str, float]:
    """Confirmed publishes/s into one queue, then consumes/s out of it."""
    name = raw_queue(settings, queue_type)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await _declare(channel, name, queue_type)
        body = b"x" * 64
        remaining = count

        async def lane() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                await channel.default_exchange.publish(message, name, mandatory=True)

        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(RAW_IN_FLIGHT)))
        publish_s = time.perf_counter() - started

        consumer_channel = await connection.channel()
        await consumer_channel.set_qos(prefetch_count=PREFETCH)
        queue = await consumer_channel.get_queue(name)
        done = asyncio.Event()
        seen = 0
        first = last = 0.0

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal seen, first, last
            await message.ack()
            seen += 1
            last = time.perf_counter()
            if seen == 1:
                first = last
            if seen == count:
                done.set()

        tag = await queue.consume(on_message)
        await done.wait()
        await queue.cancel(tag)
    return {"publish_per_s": count / publish_s, "consume_per_s": (count - 1) / (last - first)}


async def redis_limit(settings: AppSettings, count: int) -> dict[str, float]:
    """Pipelined HSETs/s, one pipeline of REDIS_PIPELINE commands at a time."""
    r = aioredis.Redis.from_url(settings.redis_url)
    prefix = f"{settings.namespace}:raw:"
    try:
        started = time.perf_counter()
        for start in range(0, count, REDIS_PIPELINE):
            pipe = r.pipeline(transaction=False)
            for i in range(start, min(count, start + REDIS_PIPELINE)):
                pipe.hset(f"{prefix}{i}", mapping={"status": "COMPLETED", "attempt": 1})
            await pipe.execute()
        elapsed = time.perf_counter() - started
        for start in range(0, count, REDIS_PIPELINE):
            keys = [f"{prefix}{i}" for i in range(start, min(count, start + REDIS_PIPELINE))]
            await r.unlink(*keys)
    finally:
        await r.aclose()
    return {"hset_per_s": count / elapsed}


async def amqp_latency(
    settings: AppSettings, queue_type: str, count: int, rate: float
) -> dict[str, float]:
    """Publish (confirmed, persistent) at a steady rate; a consumer on its own connection
    takes the time each message arrives, minus the moment its publish started."""
    name = raw_queue(settings, queue_type)
    producer = await aio_pika.connect(settings.amqp_url)
    consumer = await aio_pika.connect(settings.amqp_url)
    delays: list[float] = []
    done = asyncio.Event()
    try:
        channel = await producer.channel(publisher_confirms=True)
        await _declare(channel, name, queue_type)
        consumer_channel = await consumer.channel()
        await consumer_channel.set_qos(prefetch_count=PREFETCH)
        queue = await consumer_channel.get_queue(name)

        async def on_message(message: AbstractIncomingMessage) -> None:
            arrived = time.time()
            delays.append((arrived - struct.unpack("d", message.body)[0]) * 1000)
            await message.ack()
            if len(delays) == count:
                done.set()

        await queue.consume(on_message)

        async def publish() -> None:
            body = struct.pack("d", time.time())
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await channel.default_exchange.publish(message, name, mandatory=True)

        await paced(count, rate, publish)
        await asyncio.wait_for(done.wait(), 60)
    finally:
        await consumer.close()
        await producer.close()
    return {"p50_ms": pct(delays, 50), "p95_ms": pct(delays, 95), "p99_ms": pct(delays, 99)}
