"""taskiq: `taskiq worker benchmarks.compare.apps.taskiq_app:broker`.

taskiq-aio-pika publishes persistent messages on a channel with publisher confirms and
declares quorum queues; the worker acks after the task ran (--ack-type when_executed, or
when_saved with the result backend on).

taskiq has no group or chord; the fan-out parent does what it offers: `kiq()` for every
child (all at once, as its asyncio client allows), then `wait_result()` on each in turn,
which polls the Redis result backend. The poll interval is 10 ms instead of its 0.2 s
default, which would add up to 0.2 s to every fan-out. It needs the result backend on.
"""

from __future__ import annotations

import asyncio

from taskiq import AsyncBroker
from taskiq_aio_pika import AioPikaBroker
from taskiq_aio_pika.exchange import Exchange
from taskiq_aio_pika.queue import Queue
from taskiq_redis import RedisAsyncResultBackend

from ..stamps import CHAIN_FIRST, CHAIN_LAST, FANOUT_CHILD, FANOUT_START, record, record_collected
from .settings import FANOUT_WAIT, PREFETCH, AppSettings

settings = AppSettings.from_env()
QUEUE = f"{settings.namespace}.taskiq"
POLL = 0.01  # seconds between two result checks of one child

broker: AsyncBroker = AioPikaBroker(
    settings.amqp_url,
    qos=PREFETCH,
    exchange=Exchange(name=QUEUE),
    task_queues=[Queue(name=QUEUE, routing_key="#")],
    dead_letter_queue=Queue(name=f"{QUEUE}.dead"),
)
if settings.backend:
    broker = broker.with_result_backend(
        RedisAsyncResultBackend(
            settings.redis_url, prefix_str=f"{settings.namespace}:results", result_ex_time=600
        )
    )


@broker.task(task_name="cmp.noop")
async def noop(tag: float) -> None:
    record(tag)


@broker.task(task_name="cmp.first")
async def first() -> None:
    record(CHAIN_FIRST)
    await second.kiq()


@broker.task(task_name="cmp.second")
async def second() -> None:
    await third.kiq()


@broker.task(task_name="cmp.third")
async def third() -> None:
    record(CHAIN_LAST)


@broker.task(task_name="cmp.fanout_child")
async def fanout_child(i: int) -> int:
    record(FANOUT_CHILD)
    return i


@broker.task(task_name="cmp.fanout")
async def fanout(count: int) -> None:
    record(FANOUT_START)
    children = await asyncio.gather(*(fanout_child.kiq(i) for i in range(count)))
    values: list[object] = []
    for child in children:
        result = await child.wait_result(check_interval=POLL, timeout=FANOUT_WAIT)
        values.append(result.error if result.is_err else result.return_value)
    record_collected(values, count)
