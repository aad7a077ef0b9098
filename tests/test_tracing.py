"""Traces of runs: the span tree in process (in-memory exporter), and the spans real
worker processes export over OTLP/HTTP, for triggers from conveyor and from pika."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pika
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from benchmarks.otlp import ReceivedSpan, Receiver
from conveyor import Client, Settings
from conveyor._telemetry import wanted
from conveyor.shared import tracing
from conveyor.worker import Worker
from tests import tracing_tasks
from tests.conftest import ConveyorProcess
from tests.faults import wait_for_consumers

# -- in process, with an in-memory exporter ------------------------------------------------


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """A tracer provider for this test only (the API allows one per process: the globals
    are put back afterwards, so other tests run untraced)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    trace.set_tracer_provider(provider)
    yield memory
    provider.shutdown()
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture
async def traced_worker(
    settings: Settings, client: Client, exporter: InMemorySpanExporter
) -> AsyncIterator[Worker]:
    w = Worker(tracing_tasks.ALL, settings=settings, concurrency=10)
    await w.start()
    yield w
    await w.shutdown()


def _tree(spans: Sequence[ReadableSpan], root: ReadableSpan) -> Any:
    """(name, kind, children...) of `root`, children in start order."""
    assert root.context is not None
    below = sorted(
        (s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id),
        key=lambda s: s.start_time or 0,
    )
    return (root.name, root.kind.name, *(_tree(spans, s) for s in below))


async def _spans_of(
    exporter: InMemorySpanExporter, trace_id: int, ready: Callable[[list[ReadableSpan]], bool]
) -> list[ReadableSpan]:
    """The spans of the trace once `ready` says all have come (the attempt's span ends
    after the run's outcome is written, a moment after `result()` returned)."""
    deadline = time.monotonic() + 10
    while True:
        spans = [
            s
            for s in exporter.get_finished_spans()
            if s.context is not None and s.context.trace_id == trace_id
        ]
        if ready(spans) or time.monotonic() > deadline:
            return spans
        await asyncio.sleep(0.02)


async def test_the_span_tree_of_a_run_goes_from_the_app_span_to_every_step(
    traced_worker: Worker, exporter: InMemorySpanExporter
) -> None:
    app = trace.get_tracer("app")
    with app.start_as_current_span("handle request") as span:
        handle = await tracing_tasks.traced_steps.trigger(n=1)
    assert await handle.result(timeout=10) == 4
    trace_id = span.get_span_context().trace_id
    spans = await _spans_of(exporter, trace_id, lambda s: any(x.kind.name == "CONSUMER" for x in s))
    [root] = [s for s in spans if s.parent is None]
    assert _tree(spans, root) == (
        "handle request",
        "INTERNAL",
        (
            "publish traced-steps",
            "PRODUCER",
            (
                "process traced-steps",
                "CONSUMER",
                ("step fetch", "INTERNAL"),
                ("step transform", "INTERNAL"),
                ("step store", "INTERNAL"),
            ),
        ),
    )
    by_name = {s.name: s for s in spans}
    producer = by_name["publish traced-steps"].attributes or {}
    assert producer["messaging.system"] == "rabbitmq"
    assert producer["messaging.operation.type"] == "send"
    assert producer["messaging.destination.name"] == "traced-steps"
    assert producer["messaging.rabbitmq.destination.routing_key"] == "traced-steps"
    assert producer["messaging.message.id"] == handle.id
    consumer = by_name["process traced-steps"].attributes or {}
    assert consumer["messaging.operation.type"] == "process"
    assert consumer["messaging.message.id"] == handle.id
    assert consumer["conveyor.run.id"] == handle.id
    assert consumer["conveyor.task.id"] == "traced-steps"
    assert consumer["conveyor.attempt"] == 1
    assert consumer["conveyor.queue"] == "traced-steps"
    assert (by_name["step fetch"].attributes or {})["conveyor.step.key"] == "fetch#0"
    assert "conveyor.step.replayed" not in (by_name["step fetch"].attributes or {})


async def test_a_retry_is_in_the_same_trace_linked_to_the_failed_attempt_with_replayed_steps(
    traced_worker: Worker, exporter: InMemorySpanExporter
) -> None:
    app = trace.get_tracer("app")
    with app.start_as_current_span("handle request") as span:
        handle = await tracing_tasks.traced_steps.trigger(n=1, fail_first=True)
    assert await handle.result(timeout=10) == 4
    trace_id = span.get_span_context().trace_id
    spans = await _spans_of(
        exporter, trace_id, lambda s: sum(x.kind.name == "CONSUMER" for x in s) == 2
    )
    [producer] = [s for s in spans if s.kind.name == "PRODUCER"]
    first, second = sorted(
        (s for s in spans if s.kind.name == "CONSUMER"), key=lambda s: s.start_time or 0
    )
    assert producer.context is not None and first.context is not None
    for attempt in (first, second):
        assert attempt.parent is not None and attempt.parent.span_id == producer.context.span_id
    assert (first.attributes or {})["conveyor.attempt"] == 1
    assert (second.attributes or {})["conveyor.attempt"] == 2
    assert first.status.status_code.name == "ERROR"
    [event] = [e for e in first.events if e.name == "exception"]
    assert (event.attributes or {})["exception.type"] == "RuntimeError"
    assert "the first attempt fails" in str((event.attributes or {})["exception.stacktrace"])
    assert second.status.status_code.name == "UNSET"
    assert [link.context.span_id for link in second.links] == [first.context.span_id]

    def steps(attempt: ReadableSpan) -> list[tuple[str, bool]]:
        assert attempt.context is not None
        return [
            (s.name, bool((s.attributes or {}).get("conveyor.step.replayed")))
            for s in sorted(spans, key=lambda s: s.start_time or 0)
            if s.parent is not None and s.parent.span_id == attempt.context.span_id
        ]

    assert steps(first) == [("step fetch", False), ("step transform", False)]
    assert steps(second) == [
        ("step fetch", True),
        ("step transform", True),
        ("step store", False),
    ]


# -- real worker processes, OTLP/HTTP to a receiver of the test's own ----------------------


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture
async def exporting_worker(
    settings: Settings, client: Client, receiver: Receiver, tmp_path: Path
) -> AsyncIterator[ConveyorProcess]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": "test-worker",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    command = ["worker", "tests.tracing_tasks", "--concurrency", "10"]
    proc = ConveyorProcess(command, settings, env, tmp_path / "worker.log")
    for t in tracing_tasks.ALL:
        await wait_for_consumers(settings, t.queue, 1)
    yield proc
    proc.kill(15)  # SIGTERM: a clean shutdown flushes the last spans
    proc.wait()


def _publish_with_pika(
    settings: Settings, queue: str, body: dict[str, Any], traceparent: str
) -> None:
    """A trigger from another AMQP client, as docs/wire-format.md describes it."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            exchange=f"{settings.namespace}.runs",
            routing_key=queue,
            body=json.dumps(body).encode(),
            properties=pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                headers={"traceparent": traceparent},
            ),
            mandatory=True,
        )
    finally:
        connection.close()


async def _received(
    receiver: Receiver, trace_id: str, ready: Callable[[list[ReceivedSpan]], bool]
) -> list[ReceivedSpan]:
    deadline = time.monotonic() + 20
    while True:
        spans = [s for s in receiver.spans() if s.trace_id == trace_id]
        if ready(spans) or time.monotonic() > deadline:
            return spans
        await asyncio.sleep(0.05)


async def test_a_pika_trigger_with_a_traceparent_is_continued_by_a_worker_process_over_otlp(
    settings: Settings, exporting_worker: ConveyorProcess, receiver: Receiver
) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    run_id = f"run_{secrets.token_hex(8)}"
    body = {"task": "traced-steps", "id": run_id, "payload": {"n": 1}}
    await asyncio.to_thread(
        _publish_with_pika, settings, "traced-steps", body, f"00-{trace_id}-{parent_id}-01"
    )
    spans = await _received(receiver, trace_id, lambda s: len(s) >= 4)
    [attempt] = [s for s in spans if s.kind == "CONSUMER"]
    assert attempt.name == "process traced-steps"
    assert attempt.parent_span_id == parent_id
    assert attempt.service == "test-worker"
    assert attempt.attributes == {
        "messaging.system": "rabbitmq",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": "traced-steps",
        "messaging.rabbitmq.destination.routing_key": "traced-steps",
        "messaging.message.id": run_id,
        "conveyor.run.id": run_id,
        "conveyor.task.id": "traced-steps",
        "conveyor.attempt": 1,
        "conveyor.queue": "traced-steps",
    }
    steps = [s for s in spans if s.kind == "INTERNAL"]
    assert sorted(s.name for s in steps) == ["step fetch", "step store", "step transform"]
    assert {s.parent_span_id for s in steps} == {attempt.span_id}
    assert {s.attributes["conveyor.step.key"] for s in steps} == {
        "fetch#0",
        "transform#0",
        "store#0",
    }


async def test_a_child_run_and_the_resumed_parent_are_in_the_parents_trace(
    settings: Settings, exporting_worker: ConveyorProcess, receiver: Receiver
) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    run_id = f"run_{secrets.token_hex(8)}"
    body = {"task": "traced-parent", "id": run_id, "payload": {"n": 1}}
    await asyncio.to_thread(
        _publish_with_pika, settings, "traced-parent", body, f"00-{trace_id}-{parent_id}-01"
    )

    def done(spans: list[ReceivedSpan]) -> bool:
        return sum(s.kind == "CONSUMER" for s in spans) >= 3 and any(
            s.name == "step store" for s in spans
        )

    spans = await _received(receiver, trace_id, done)
    by_id = {s.span_id: s for s in spans}
    parents = sorted(
        (s for s in spans if s.name == "process traced-parent"),
        key=lambda s: s.attributes["conveyor.attempt"],
    )
    assert [p.attributes["conveyor.attempt"] for p in parents] == [1, 2]
    # Both attempts of the parent come from the pika trigger; the second links to the first.
    assert {p.parent_span_id for p in parents} == {parent_id}
    assert parents[1].links == [(trace_id, parents[0].span_id)]
    # The child's trigger is under the parent's wait, under the parent's first attempt.
    [publish] = [s for s in spans if s.kind == "PRODUCER"]
    assert publish.name == "publish traced-child"
    wait = by_id[publish.parent_span_id]
    assert wait.name == "wait child"
    assert wait.parent_span_id == parents[0].span_id
    [child] = [s for s in spans if s.name == "process traced-child"]
    assert child.parent_span_id == publish.span_id
    assert child.attributes["conveyor.run.id"] == publish.attributes["conveyor.run.id"]
    [fetch] = [s for s in spans if s.name == "step fetch"]
    assert fetch.parent_span_id == child.span_id
    # The resumed parent replays the wait and runs its last step.
    below_second = {s.name: s for s in spans if s.parent_span_id == parents[1].span_id}
    assert below_second["wait child"].attributes["conveyor.step.replayed"] is True
    assert "step store" in below_second


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "exporters"),
    [
        ({}, []),
        ({"OTEL_SERVICE_NAME": "w"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, []),
    ],
)
def test_tracing_is_set_up_only_when_the_environment_asks_for_it(
    env: dict[str, str], exporters: list[str]
) -> None:
    assert wanted(env) == exporters


def test_without_a_tracer_provider_nothing_is_traced() -> None:
    assert tracing.tracer() is None
    assert tracing.current_carrier() is None
