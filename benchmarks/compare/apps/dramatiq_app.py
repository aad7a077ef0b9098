"""Dramatiq: `dramatiq benchmarks.compare.apps.dramatiq_app`.

Persistent messages with publisher confirms; Dramatiq acks after the actor ran. Its
RabbitMQ broker declares classic queues only. Results go to Redis only when the backend
is on.

The fan-out is a group run by a parent actor, which then blocks on the group's results
(`get_results(block=True)`, one BRPOPLPUSH per child on the Results middleware's Redis
backend): the parent holds one of the process's worker threads while it waits, the
other seven run the children. It needs the result backend on.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

from ..stamps import CHAIN_FIRST, CHAIN_LAST, FANOUT_CHILD, FANOUT_START, record, record_collected
from .settings import FANOUT_WAIT, AppSettings

settings = AppSettings.from_env()
QUEUE = f"{settings.namespace}.dramatiq"

broker = RabbitmqBroker(url=settings.amqp_url, confirm_delivery=True)
if settings.backend:
    backend = RedisBackend(url=settings.redis_url, namespace=f"{settings.namespace}:results")
    broker.add_middleware(Results(backend=backend, store_results=True))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, actor_name="cmp_noop", max_retries=0)
def noop(tag: float) -> None:
    record(tag)


@dramatiq.actor(queue_name=QUEUE, actor_name="cmp_first", max_retries=0)
def first() -> None:
    record(CHAIN_FIRST)
    second.send()


@dramatiq.actor(queue_name=QUEUE, actor_name="cmp_second", max_retries=0)
def second() -> None:
    third.send()


@dramatiq.actor(queue_name=QUEUE, actor_name="cmp_third", max_retries=0)
def third() -> None:
    record(CHAIN_LAST)


@dramatiq.actor(queue_name=QUEUE, actor_name="cmp_fanout_child", max_retries=0)
def fanout_child(i: int) -> int:
    record(FANOUT_CHILD)
    return i


@dramatiq.actor(queue_name=QUEUE, actor_name="cmp_fanout", max_retries=0)
def fanout(count: int) -> None:
    record(FANOUT_START)
    children = dramatiq.group(fanout_child.message(i) for i in range(count)).run()
    values = list(children.get_results(block=True, timeout=int(FANOUT_WAIT * 1000)))
    record_collected(values, count)
