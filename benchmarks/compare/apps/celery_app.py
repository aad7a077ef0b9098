"""Celery: `celery -A benchmarks.compare.apps.celery_app worker`.

Settings for delivery guarantees equal to conveyor's (reasons in benchmarks/README.md):
persistent messages on a quorum queue, publisher confirms, ack after the task ran, a task
whose worker process died is requeued, results only when the backend is on.

The fan-out is Celery's chord: the parent publishes a group of children with a callback;
the Redis result backend counts the children's results and the last one to finish sends
the callback, which gets them all. (A task must not wait for other tasks' results in
Celery: `result.get()` inside a task raises.) It needs the result backend on.
"""

from __future__ import annotations

from celery import Celery, chord

from ..stamps import CHAIN_FIRST, CHAIN_LAST, FANOUT_CHILD, FANOUT_START, record, record_collected
from .settings import PREFETCH, AppSettings

settings = AppSettings.from_env()
QUEUE = f"{settings.namespace}.celery"

app = Celery(
    settings.namespace,
    broker=settings.amqp_url,
    backend=settings.redis_url if settings.backend else None,
)
app.conf.update(
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_routing_key=QUEUE,
    task_default_queue_type="quorum",
    task_default_delivery_mode="persistent",
    broker_transport_options={"confirm_publish": True},
    broker_connection_retry_on_startup=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_ignore_result=not settings.backend,
    result_backend_transport_options={"global_keyprefix": f"{settings.namespace}:"},
    result_expires=600,
    # Celery's prefetch is multiplier x pool processes: PREFETCH unacked messages per pool
    # process, as every other system holds PREFETCH per worker process.
    worker_prefetch_multiplier=PREFETCH,
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    worker_hijack_root_logger=False,
)


@app.task(name="cmp.noop")
def noop(tag: float) -> None:
    record(tag)


@app.task(name="cmp.first")
def first() -> None:
    record(CHAIN_FIRST)
    second.delay()


@app.task(name="cmp.second")
def second() -> None:
    third.delay()


@app.task(name="cmp.third")
def third() -> None:
    record(CHAIN_LAST)


@app.task(name="cmp.fanout_child")
def fanout_child(i: int) -> int:
    record(FANOUT_CHILD)
    return i


@app.task(name="cmp.fanout_collect")
def fanout_collect(values: list[int], count: int) -> None:
    record_collected(values, count)


@app.task(name="cmp.fanout")
def fanout(count: int) -> None:
    record(FANOUT_START)
    chord(fanout_child.s(i) for i in range(count))(fanout_collect.s(count))
