"""taskiq: `taskiq worker benchmarks.compare.apps.taskiq_app:broker`.

taskiq-aio-pika publishes persistent messages on a channel with publisher confirms and
declares quorum queues; the worker acks after the task ran (--ack-type when_executed, or
when_saved with the result backend on).
"""

from __future__ import annotations

from taskiq import AsyncBroker
from taskiq_aio_pika import AioPikaBroker
from taskiq_aio_pika.exchange import Exchange
from taskiq_aio_pika.queue import Queue
from taskiq_redis import RedisAsyncResultBackend

from ..stamps import CHAIN_FIRST, CHAIN_LAST, record
from .settings import PREFETCH, AppSettings

settings = AppSettings.from_env()
QUEUE = f"{settings.namespace}.taskiq"

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
